"""Capture for the transformer families (PixArt, SD3, SD3.5, Flux) on tiny random copies: recorded probabilities
against an independent computation, untouched images, head identity, patch grids, restoration, constant memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_dit as td
from tiny_pipelines import one_thread  # noqa: F401  (autouse fixture)
from auditor import trace
from auditor.engine import capture_dit
from auditor.engine.heads import HeadIndex, text_attention_modules
from auditor.errors import AuditorError

FAMILIES = ["pixart", "sd3", "sd35", "flux"]
SEQ = 24  # the T5 sequence length the tests generate with (td.generate's max_sequence_length)


def _rotate(x, rope):
    """Rotary embedding on [B, S, heads, d] with (cos, sin) [S, d], pairs of adjacent channels rotated (Flux's
    convention), written out here rather than taken from diffusers."""
    cos, sin = (t[None, :, None, :].float() for t in rope)
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x.float() * cos + turned * sin


def _reference(name, attn, call, text_len):
    """[items, heads, image queries, text keys]: softmax(Q K^T / sqrt(d) + mask) over every key, text columns."""
    hs, ehs, mask, rope = call
    b = hs.shape[0]

    def split(x):  # [B, S, heads*d] -> [B, S, heads, d]
        return x.view(b, x.shape[1], attn.heads, -1)

    def norm(which, x):  # SD3 without qk norms has none
        f = getattr(attn, which, None)
        return x if f is None else f(x)

    if name.endswith("attn2"):  # PixArt: plain cross-attention, padding masked
        q, k = split(attn.to_q(hs)), split(attn.to_k(ehs))
        bias, image, text = mask.float()[:, None], slice(0, hs.shape[1]), slice(0, ehs.shape[1])
    else:
        q, k = norm("norm_q", split(attn.to_q(hs))), norm("norm_k", split(attn.to_k(hs)))
        bias = None
        if ehs is not None:
            eq, ek = norm("norm_added_q", split(attn.add_q_proj(ehs))), norm("norm_added_k", split(attn.add_k_proj(ehs)))
            if rope is None:  # SD3: [image; text]
                q, k = torch.cat([q, eq], 1), torch.cat([k, ek], 1)
                image, text = slice(0, hs.shape[1]), slice(hs.shape[1], None)
            else:  # Flux double-stream: [text; image]
                q, k = torch.cat([eq, q], 1), torch.cat([ek, k], 1)
                image, text = slice(ehs.shape[1], None), slice(0, ehs.shape[1])
        else:  # Flux single-stream: one sequence, text first
            image, text = slice(text_len, None), slice(0, text_len)
        if rope is not None:
            q, k = _rotate(q, rope), _rotate(k, rope)
    q, k = q.float().transpose(1, 2), k.float().transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if bias is not None:
        scores = scores + bias
    return scores.softmax(-1)[:, :, image, text]


def _traced_with_reference(pipe, **kw):
    calls: dict[str, list] = {}
    handles = []
    modules = dict(text_attention_modules(pipe.transformer))
    for name, mod in modules.items():
        def grab(module, args, kwargs, name=name):
            hs = kwargs.get("hidden_states", args[0] if args else None)
            calls.setdefault(name, []).append((hs.detach(), kwargs.get("encoder_hidden_states"),
                                               kwargs.get("attention_mask"), kwargs.get("image_rotary_emb")))
        handles.append(mod.register_forward_pre_hook(grab, with_kwargs=True))
    try:
        with trace(pipe) as tr:
            images = td.generate(pipe, **kw)
    finally:
        for h in handles:
            h.remove()
    cfg = type(pipe).__name__ != "FluxPipeline" and kw.get("guidance_scale", 5.0) > 1
    ref = {}
    with torch.no_grad():
        for name, got in calls.items():
            total = 0
            for call in got:
                p = _reference(name, modules[name], call, SEQ)
                total = total + (p[p.shape[0] // 2:] if cfg else p)
            ref[name] = total
    return tr, ref, images


@pytest.mark.parametrize("family, kernel", [("pixart", None)] + [(f, k) for f in FAMILIES[1:]
                                                                for k in ("flash", "flash-at-once", "flash-bounded",
                                                                          "flash-chunked", "explicit")])
def test_probabilities_equal_explicit_reference(family, kernel, monkeypatch):
    """Joint attention's recorded rows come from CPU flash attention's log-sum-exp where SDPA runs that kernel,
    else from explicit scores: every path against the reference. Small calls wait and are scored together
    ("flash"); "flash-at-once" scores each call as it runs, as a large layer's are; "flash-bounded" lets no more
    than one call wait (the bound on what waiting calls hold), so they are scored a few at a time; "flash-chunked"
    scores the waiting calls one per batched product (the products' cache-sized bound)."""
    products = []
    if kernel == "flash-chunked":
        monkeypatch.setattr(capture_dit, "CPU_BLOCK_BYTES", 1)
        score = capture_dit.text_probs
        monkeypatch.setattr(capture_dit, "text_probs", lambda *a: products.append(1) or score(*a))
    if kernel == "flash-at-once":
        monkeypatch.setattr(capture_dit, "DEFER_SCORE_BYTES", 0)
    flushed = []
    if kernel == "flash-bounded":
        monkeypatch.setattr(capture_dit, "DEFER_TOTAL_BYTES", 1)
        flush = capture_dit.PendingCalls.flush
        monkeypatch.setattr(capture_dit.PendingCalls, "flush",
                            lambda self, tap: flushed.append(len(self.calls)) or flush(self, tap))
    fused = capture_dit._sdpa_with_lse
    used = []

    def spy(*a):
        got = None if kernel == "explicit" else fused(*a)
        used.append(got is not None)
        return got

    monkeypatch.setattr(capture_dit, "_sdpa_with_lse", spy)
    tr, ref, images = _traced_with_reference(td.shared(family), prompt=["a red cat", "a blue car"])
    assert kernel is None or (used and all(used) == kernel.startswith("flash"))
    waited = tr.pending is not None and any(tr.pending.layer_bytes.values())
    assert waited == (kernel in ("flash", "flash-bounded", "flash-chunked"))  # tiny calls wait unless told not to
    if kernel == "flash-bounded":  # every call scored as soon as it was kept: during the generation, not after it
        assert len(flushed) == 2 * len(ref) and set(flushed) == {1}
    if kernel == "flash-chunked":  # two steps of every layer, one product each
        assert len(products) == 2 * len(ref)
    assert set(tr.buffers) == set(ref) and tr.n_items == 2 == len(images)
    for name, r in ref.items():
        torch.testing.assert_close(tr.buffers[name], r, atol=1e-5, rtol=1e-4)
    buf = tr.buffers[tr.layers[0]]
    assert buf.shape[2:] == (16, _seq_len(family))  # [items, heads, 4x4 patch grid, text tokens]
    if family == "pixart":
        # rows sum to one over the text keys alone, and the padding after "a red cat</s>" gets nothing
        torch.testing.assert_close(buf.sum(-1), torch.full(buf.shape[:3], 2.0), atol=1e-4, rtol=0)
        n = len(td.t5_tokenizer()("a red cat")["input_ids"])
        assert float(buf[0, :, :, n:].abs().max()) < 1e-6
    else:
        # joint attention: the text keys get part of each image query's probability, never all of it
        share = buf.sum(-1) / 2
        assert float(share.max()) < 1.0 and float(share.min()) > 0.0


def _seq_len(family):
    return 77 + SEQ if family.startswith("sd3") else SEQ


@pytest.mark.parametrize("family", FAMILIES)
def test_images_identical_with_and_without_trace(family):
    pipe = td.shared(family)
    plain = td.generate(pipe, seed=3)
    with trace(pipe) as tr:
        traced = td.generate(pipe, seed=3)
    np.testing.assert_allclose(traced, plain, atol=1e-5)
    assert tr.steps_counted == 2 and tr.seq_len == _seq_len(family)


@pytest.mark.parametrize("family, layers", [
    ("pixart", ["transformer_blocks.0.attn2", "transformer_blocks.1.attn2"]),
    ("sd3", ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]),
    ("sd35", ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]),  # not block 0's attn2 (image only)
    ("flux", ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]),
])
def test_head_counts_and_names(family, layers):
    net = td.shared(family).transformer
    hi = HeadIndex.from_unet(net)
    assert list(hi.layers) == layers  # forward order: double-stream before single-stream
    assert hi.total == td.EXPECTED_HEADS[family] == sum(int(m.heads) for _, m in text_attention_modules(net))
    assert HeadIndex.from_names(hi.names) == hi and hi.name(hi.total - 1) == f"{layers[-1]}#h{hi.heads_per_layer[-1] - 1}"
    if family == "sd35":
        assert net.transformer_blocks[0].attn2 is not None
    if family.startswith("sd3"):
        assert net.transformer_blocks[-1].attn.context_pre_only  # the last block's form is among those traced


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_non_square_patch_grid(family):
    pipe = td.shared(family)
    with trace(pipe) as tr:
        td.generate(pipe, height=64, width=96)
    assert tr.latent_size == (4, 6) and set(tr.grids.values()) == {(4, 6)} and tr.image_size == (64, 96)
    assert tr.maps("cat", method="all_heads").shape == (64, 96)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_trace_read_inside_its_block_sees_the_calls_still_waiting(family):
    # maps ask for the layers' grids before their sums: the grids must be known while the calls wait
    pipe = td.shared(family)
    with trace(pipe) as tr:
        td.generate(pipe, height=64, width=96)
        assert tr.pending.calls and set(tr.grids.values()) == {(4, 6)} and len(tr.grids) == len(tr.layers)
        assert tr.maps("cat", method="all_heads", size="latent").shape == (4, 6)
        assert not tr.pending.calls


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_buffers_do_not_grow_with_steps(family):
    pipe = td.shared(family)
    with trace(pipe) as short:
        td.generate(pipe, steps=2)
    with trace(pipe) as long:
        td.generate(pipe, steps=5)
    assert short.nbytes() == long.nbytes() > 0 and (short.steps_counted, long.steps_counted) == (2, 5)


@pytest.mark.parametrize("family", FAMILIES)
def test_processors_restored_on_exit_and_on_error(family):
    pipe = td.BUILDERS[family](seed=1)
    before = dict(pipe.transformer.attn_processors)

    def boom(*args):  # PixArt calls callback(i, t, latents); the others callback_on_step_end(pipe, i, t, kwargs)
        if args[-3 if len(args) == 3 else 1] == 1:
            raise RuntimeError("stop here")
        return args[-1]

    stop = dict(callback=boom) if family == "pixart" else dict(callback_on_step_end=boom)

    with trace(pipe):
        during = {type(v).__name__ for v in pipe.transformer.attn_processors.values()}
    assert {"_TapProcessor", "_JointTapProcessor", "_FluxTapProcessor"} & during
    with pytest.raises(RuntimeError, match="stop here"):
        with trace(pipe) as tr:
            td.generate(pipe, steps=3, **stop)
    after = pipe.transformer.attn_processors
    assert all(after[k] is before[k] for k in before)
    assert "encode_prompt" not in vars(pipe) and not pipe.transformer._forward_pre_hooks
    assert tr.steps_seen == 2


def test_flux_true_guidance_records_only_the_prompts_pass():
    pipe = td.shared("flux")
    with trace(pipe) as tr:
        td.generate(pipe, prompt="a red cat", negative_prompt="a green dog", true_cfg_scale=2.0)
    assert tr.prompts == ["a red cat"] and tr.steps_counted == 2 and tr.n_items == 1


def test_sd3_unknown_processor_is_refused():
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe = td.build_sd3(seed=2)
    pipe.transformer.transformer_blocks[0].attn.set_processor(AttnProcessor2_0())
    with pytest.raises(AuditorError, match="AttnProcessor2_0"):
        with trace(pipe):
            pass
    assert not {"_JointTapProcessor"} & {type(v).__name__ for v in pipe.transformer.attn_processors.values()}


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_columns_keep_the_prompts_tokens_and_compute_only_them(family, monkeypatch):
    """``trace(tokens="prompt")`` keeps the columns the prompts' tokens fill (no padding): the same word maps and
    per-column sums as a full trace, and the joint recorder computes probabilities for those columns alone."""
    pipe = td.shared(family)
    prompts = ["a red cat", "a blue car next to a tree"]
    with trace(pipe) as full:
        td.generate(pipe, prompt=prompts, seed=5)
    widths = []
    score = capture_dit.text_probs

    def spy(q, kt, lse, scale):  # the keys scored: the kept columns alone
        widths.append(int(kt.shape[-1]))
        return score(q, kt, lse, scale)

    monkeypatch.setattr(capture_dit, "text_probs", spy)
    with trace(pipe, tokens="prompt") as kept:
        td.generate(pipe, prompt=prompts, seed=5)
    padding = set(full.special_tokens(1)["padding"])
    cols = [c for c in range(full.seq_len) if c not in padding]
    assert kept.columns == tuple(cols) and kept.seq_len == full.seq_len and len(cols) < full.seq_len
    for name, buf in kept.buffers.items():
        torch.testing.assert_close(buf, full.buffers[name][..., cols], atol=1e-6, rtol=1e-5)
    for item, word in ((0, "cat"), (1, "tree")):
        np.testing.assert_allclose(kept.maps(word, method="all_heads", prompt_index=item),
                                   full.maps(word, method="all_heads", prompt_index=item), atol=1e-6)
    if family != "pixart":  # joint attention: only the kept columns' keys were scored
        assert widths and set(widths) == {len(cols)}
    with pytest.raises(AuditorError, match="not recorded"):
        kept.maps(sorted(padding)[-1:], method="all_heads")
