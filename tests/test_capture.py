"""auditor.engine.capture: recorded probabilities, untouched outputs, restoration, batch layouts, head identity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_pipelines as tp
from tiny_pipelines import one_thread  # noqa: F401  (autouse fixture)
from auditor import trace
from auditor.engine.capture import layer_grid
from auditor.engine.capture_cross import attend
from auditor.engine.heads import HeadIndex, cross_attention_modules
from auditor.errors import AuditorError


def _reference_run(pipe, steps=2, seed=0, **kw):
    """Trace a generation and, independently, recompute every layer's conditional-half probability sums from the
    module's own to_q/to_k on the inputs it received: softmax(Q K^T / sqrt(d))."""
    inputs: dict[str, list] = {}
    handles = []
    for name, mod in cross_attention_modules(pipe.unet):
        def grab(module, args, kwargs, name=name):
            inputs.setdefault(name, []).append((args[0].detach(), kwargs["encoder_hidden_states"].detach()))
        handles.append(mod.register_forward_pre_hook(grab, with_kwargs=True))
    try:
        with trace(pipe) as tr:
            images = tp.generate(pipe, steps=steps, seed=seed, **kw)
    finally:
        for h in handles:
            h.remove()
    cfg = kw.get("guidance_scale", 7.5) > 1
    ref = {}
    mods = dict(cross_attention_modules(pipe.unet))
    with torch.no_grad():
        for name, calls in inputs.items():
            attn, total = mods[name], 0
            for hs, ehs in calls:
                b = hs.shape[0]
                d = attn.to_q.out_features // attn.heads
                q = attn.to_q(hs).view(b, -1, attn.heads, d).transpose(1, 2)
                k = attn.to_k(ehs).view(b, -1, attn.heads, d).transpose(1, 2)
                p = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1)
                total = total + (p[b // 2:] if cfg else p)
            ref[name] = total
    return tr, ref, images


def _assert_matches(tr, ref):
    assert set(tr.buffers) == set(ref)
    for name, r in ref.items():
        torch.testing.assert_close(tr.buffers[name], r, atol=1e-5, rtol=1e-4)


def test_probabilities_equal_explicit_reference():
    tr, ref, _ = _reference_run(tp.sd15(), steps=2, prompt="a red cat next to a blue car")
    _assert_matches(tr, ref)
    buf = tr.buffers[tr.layers[0]]
    assert buf.shape == (1, 8, 64, 77)  # [items, heads, 8x8 latent, tokens]
    # every query's probabilities sum to one per step
    torch.testing.assert_close(buf.sum(-1), torch.full(buf.shape[:3], 2.0), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kw, items", [
    (dict(guidance_scale=1.0), 1),
    (dict(negative_prompt="blurry"), 1),
    (dict(prompt=["a red cat", "a blue car"]), 2),
    (dict(prompt=["a red cat", "a blue car"], num_images_per_prompt=2, negative_prompt=["dark", "grey"]), 4),
])
def test_batch_layouts_record_the_conditional_items(kw, items):
    tr, ref, images = _reference_run(tp.sd15(), **kw)
    _assert_matches(tr, ref)
    assert tr.n_items == items == len(images)
    assert tr.prompts == ([kw["prompt"]] if isinstance(kw.get("prompt"), str) else kw.get("prompt", ["a red cat"]))
    if items == 4:
        assert tr.images_per_prompt == 2 and tr.item(1, 0) == 2
        first = tr.buffers[tr.layers[0]]
        assert not torch.allclose(first[0], first[1])  # same prompt, different noise


@pytest.mark.parametrize("builder", [tp.sd15, tp.sd21, tp.sdxl])
def test_images_identical_with_and_without_trace(builder):
    pipe = builder()
    plain = tp.generate(pipe, seed=3, steps=2)
    with trace(pipe) as tr:
        traced = tp.generate(pipe, seed=3, steps=2)
    np.testing.assert_allclose(traced, plain, atol=1e-5)
    assert tr.steps_counted == 2


@pytest.mark.parametrize("builder, expected", [(tp.sd15, 128), (tp.sd21, 195), (tp.sdxl, 1300)])
def test_head_counts_and_names(builder, expected):
    pipe = builder()
    hi = HeadIndex.from_unet(pipe.unet)
    assert hi.total == expected == len(hi.names) == len(set(hi.names))
    assert HeadIndex.from_names(hi.names) == hi
    i = 37
    assert hi.index(hi.name(i)) == i
    layer, j = hi.locate(i)
    assert hi.name(i) == f"{layer}#h{j}" and layer.endswith("attn2")
    assert all(".attn2" in n for n in hi.layers)
    # forward order: down, mid, up
    stages = [n.split(".")[0] for n in hi.layers]
    assert stages == sorted(stages, key=["down_blocks", "mid_block", "up_blocks"].index)


def test_sd15_head_name_format():
    names = HeadIndex.from_unet(tp.sd15().unet).names
    assert "up_blocks.1.attentions.0.transformer_blocks.0.attn2#h3" in names
    assert names[0] == "down_blocks.0.attentions.0.transformer_blocks.0.attn2#h0"
    assert names[48] == "mid_block.attentions.0.transformer_blocks.0.attn2#h0"  # 6 down layers x 8 heads first


def test_buffers_do_not_grow_with_steps():
    pipe = tp.sd15()
    with trace(pipe) as short:
        tp.generate(pipe, steps=2)
    with trace(pipe) as long:
        tp.generate(pipe, steps=6)
    assert short.nbytes() == long.nbytes() > 0
    assert (short.steps_counted, long.steps_counted) == (2, 6)
    # means over steps stay probabilities whatever the step count
    assert abs(float(long.buffers[long.layers[0]].sum(-1).mean()) / 6 - 1) < 1e-4


def test_timestep_window_counts_only_its_steps():
    pipe = tp.sd15()
    with trace(pipe, window=(0.5, 1.0)) as half:
        tp.generate(pipe, steps=4)
    with trace(pipe) as whole:
        tp.generate(pipe, steps=4)
    assert half.steps_counted == 2 and whole.steps_counted == 4
    name = half.layers[0]
    assert not torch.allclose(half.buffers[name] * 2, whole.buffers[name])
    with pytest.raises(AuditorError):
        trace(pipe, window=(0.6, 0.2)).__enter__()


def test_processors_restored_after_exception_mid_generation():
    pipe = tp._build_sd("sd21", 1)
    from diffusers.models.attention_processor import AttnProcessor

    # a non-default backend on the cross-attention layers must come back as the same objects
    for _, mod in cross_attention_modules(pipe.unet):
        mod.set_processor(AttnProcessor())
    before = dict(pipe.unet.attn_processors)

    def boom(p, i, t, kw):
        if i == 1:
            raise RuntimeError("stop here")
        return kw

    with pytest.raises(RuntimeError, match="stop here"):
        with trace(pipe) as tr:
            tp.generate(pipe, steps=3, callback_on_step_end=boom)
    after = pipe.unet.attn_processors
    assert all(after[k] is before[k] for k in before)
    assert "encode_prompt" not in vars(pipe) and not pipe.unet._forward_pre_hooks
    assert tr.steps_seen == 2  # it did run under the trace


def test_self_attention_untouched_during_trace():
    pipe = tp.sd15()
    seen = {}
    with trace(pipe):
        seen = {k: type(v).__name__ for k, v in pipe.unet.attn_processors.items()}
    assert all(v == "AttnProcessor2_0" for k, v in seen.items() if ".attn1." in k)
    assert all(v == "_TapProcessor" for k, v in seen.items() if ".attn2." in k)


def test_traces_do_not_nest():
    pipe = tp.sd15()
    with trace(pipe):
        with pytest.raises(AuditorError, match="already being traced"):
            with trace(pipe):
                pass
        assert {type(p).__name__ for k, p in pipe.unet.attn_processors.items() if ".attn2." in k} == {"_TapProcessor"}
    assert "_TapProcessor" not in {type(p).__name__ for p in pipe.unet.attn_processors.values()}


def test_unknown_processor_is_refused_and_nothing_installed():
    pipe = tp._build_sd("sd15", 2)

    class Custom:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
            return hidden_states

    name, mod = cross_attention_modules(pipe.unet)[3]
    mod.set_processor(Custom())
    with pytest.raises(AuditorError, match="Custom"):
        with trace(pipe):
            pass
    assert "_TapProcessor" not in {type(v).__name__ for v in pipe.unet.attn_processors.values()}


def test_non_square_grids_come_from_the_latent():
    pipe = tp.sd15()
    with trace(pipe) as tr:
        tp.generate(pipe, width=96)
    assert tr.image_size == (64, 96) and tr.latent_size == (8, 12)
    assert set(tr.grids.values()) == {(8, 12), (4, 6), (2, 3), (1, 2)}  # 3 -> 2 rounds up, as the convs do
    assert tr.maps("cat", method="all_heads").shape == (64, 96)
    assert layer_grid((8, 12), 6) == (2, 3)
    with pytest.raises(AuditorError):
        layer_grid((8, 12), 7)


def test_token_subset_and_special_tokens():
    pipe = tp.sd15()
    with trace(pipe, tokens=[0, 3, 4]) as tr:
        tp.generate(pipe, prompt="a red cat")
    assert tr.buffers[tr.layers[0]].shape[-1] == 3
    assert tr.token_indices("cat") == (3,) and tr.column(3) == 1
    assert tr.special_tokens() == {"start": [0], "end": [4], "padding": list(range(5, 77))}
    assert tr.maps([0], method="all_heads").shape == (64, 64)  # the start token's map, on request
    with pytest.raises(AuditorError, match="not recorded"):
        tr.maps("red", method="all_heads")


def _attention(query_dim, **kw):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(query_dim=query_dim, heads=4, dim_head=4, **kw).eval()


@pytest.mark.parametrize("kw, four_d", [
    (dict(cross_attention_dim=12), False),
    (dict(cross_attention_dim=12, cross_attention_norm="layer_norm", upcast_attention=True), False),
    (dict(cross_attention_dim=12, norm_num_groups=4, residual_connection=True, rescale_output_factor=2.0), True),
    (dict(cross_attention_dim=12, spatial_norm_dim=4, residual_connection=True), True),
    (dict(cross_attention_dim=12, cross_attention_norm="group_norm", cross_attention_norm_num_groups=3,
          qk_norm="layer_norm", bias=True), False),
])
@pytest.mark.parametrize("block, first_recorded, split", [(None, 0, False), (4, 0, False), (4, 1, False),
                                                          (4, 1, True)])
def test_output_matches_stock_processor(kw, four_d, block, first_recorded, split, monkeypatch):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from auditor.engine import capture_cross as capture

    if block:
        monkeypatch.setattr(capture, "block_rows", lambda *a: block)
    if split:  # the unrecorded item through SDPA even for this small layer
        monkeypatch.setattr(capture, "SPLIT_MIN_SCORES", 0)

    c = 32 if kw.get("spatial_norm_dim") else 16  # SpatialNorm's group norm has 32 groups
    attn = _attention(c, **kw)
    hs = torch.randn(2, c, 3, 5) if four_d else torch.randn(2, 15, c)
    ehs = torch.randn(2, 7, 12)
    temb = torch.randn(2, 4, 3, 5) if kw.get("spatial_norm_dim") else None
    mask = torch.zeros(2, 1, 7)
    mask[1, 0, 5:] = -10000.0  # the UNet's additive form of an encoder attention mask
    seen = []
    with torch.no_grad():
        for m in (None, mask):
            got = attend(attn, hs, ehs, attention_mask=m, temb=temb, observe=lambda q, p, rows, n: seen.append(p),
                         first_recorded=first_recorded)
            # SDPA and the classic explicit backend (which predates q/k norms, so only without them)
            for stock in (AttnProcessor2_0(),) + (() if "qk_norm" in kw else (AttnProcessor(),)):
                torch.testing.assert_close(got, stock(attn, hs, ehs, attention_mask=m, temb=temb), atol=1e-5, rtol=1e-5)
    masked = [p for p in seen[len(seen) // 2:]]  # the blocks of the masked call, recorded items only
    assert all(p.shape[0] == 2 - first_recorded for p in masked)
    assert all(p[-1, :, :, 5:].abs().max() < 1e-6 for p in masked)  # masked keys get no attention
    assert sum(p.shape[2] for p in masked) == 15


def test_query_blocks_and_split_batch_give_the_same_probabilities_and_images(monkeypatch):
    from auditor.engine import capture_cross as capture

    pipe = tp.sd15()
    whole = tp.generate(pipe, seed=5, guidance_scale=3.0, negative_prompt="grey")
    monkeypatch.setattr(capture, "block_rows", lambda *a: 7)  # 7 does not divide 64: a ragged last block too
    monkeypatch.setattr(capture, "SPLIT_MIN_SCORES", 0)  # and the unconditional half through SDPA
    tr, ref, images = _reference_run(pipe, seed=5, guidance_scale=3.0, negative_prompt="grey")
    _assert_matches(tr, ref)
    np.testing.assert_allclose(images, whole, atol=1e-5)
    assert capture.block_rows(torch.device("cpu"), 2, 8, 4096, 77) == 7
    monkeypatch.undo()
    assert capture.block_rows(torch.device("cpu"), 2, 8, 4096, 77) == (2 << 20) // (4 * 2 * 8 * 77)
    assert capture.block_rows(torch.device("meta"), 2, 8, 4096, 77) == 4096


def test_prompt_columns_on_a_unet_equal_the_full_trace_columns():
    """``trace(tokens="prompt")`` on SD1.5: the prompt's columns (start, words, end) and nothing of the padding."""
    pipe = tp.sd15()
    with trace(pipe) as full:
        tp.generate(pipe, prompt="a red cat")
    with trace(pipe, tokens="prompt") as kept:
        tp.generate(pipe, prompt="a red cat")
    n = len(pipe.tokenizer("a red cat")["input_ids"])
    assert kept.columns == tuple(range(n)) and kept.seq_len == full.seq_len == 77
    for name, buf in kept.buffers.items():
        torch.testing.assert_close(buf, full.buffers[name][..., :n], atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(kept.maps("cat", method="all_heads"), full.maps("cat", method="all_heads"), atol=1e-6)
    with pytest.raises(AuditorError, match="tokens must be"):
        trace(pipe, tokens="all").__enter__()


def test_prompt_columns_on_sdxl_cover_a_longer_prompt_2():
    """SDXL's second encoder reads ``prompt_2`` in the same columns: its longer text keeps its columns too."""
    pipe = tp.sdxl()
    kw = dict(prompt="a cat", prompt_2="a red cat on a green mat")
    with trace(pipe) as full:
        tp.generate(pipe, **kw)
    with trace(pipe, tokens="prompt") as kept:
        tp.generate(pipe, **kw)
    n = len(pipe.tokenizer_2(kw["prompt_2"])["input_ids"])
    assert kept.columns == tuple(range(n)) and n > len(pipe.tokenizer(kw["prompt"])["input_ids"])
    np.testing.assert_allclose(kept.maps("mat", method="all_heads"), full.maps("mat", method="all_heads"), atol=1e-6)
