"""Capture for the transformer families: the processors that record SD3's and Flux's joint attention.

PixArt-α/Σ reads the text through ordinary cross-attention (``attn2``, T5 padding passed as an additive
``encoder_attention_mask``), which ``auditor.engine.capture``'s processor already records. SD3/SD3.5 and Flux run one
softmax over image and text keys together:

- SD3 (``JointAttnProcessor2_0``): queries and keys are [image; text]; the last block's ``context_pre_only`` form
  leaves the text output unprojected. SD3.5's ``attn2`` is image self-attention and is not tapped.
- Flux double-stream blocks (``FluxAttnProcessor`` with ``add_k_proj``): [text; image], rotary embeddings on both;
  single-stream blocks: one sequence whose first ``text_len`` tokens are the text (known from the transformer's
  inputs, ``Tap.text_len``).

A head's text→image map is the image queries' probabilities on the text keys, normalised over all keys as the
model normalises them; only the text columns are kept. Every query's output is computed as the stock processor
computes it (the recorded items' from the explicit probabilities, the others through SDPA), so images are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from auditor.engine.capture import layer_grid, take
from auditor.engine.capture_cross import CPU_BLOCK_BYTES, _explicit, block_rows
from auditor.engine.heads import joint_kind
from auditor.errors import AuditorError

SD3_PROCESSORS = frozenset({"JointAttnProcessor2_0"})
FLUX_PROCESSORS = frozenset({"FluxAttnProcessor", "FluxAttnProcessor2_0"})
FLASH = int(SDPBackend.FLASH_ATTENTION)


def latent_per_cell(denoiser) -> int:
    """Latent pixels per side of one image token: the patch size (Flux packs 2x2 latents into a token)."""
    if type(denoiser).__name__.startswith("Flux"):
        return 2
    return int(getattr(denoiser.config, "patch_size", 1) or 1)


def step_inputs(denoiser, args, kwargs, memo: dict | None = None):
    """(image input, patch grid (h, w), text tokens, timestep) of one transformer evaluation, from its inputs.

    SD3 and PixArt take the latent [B, C, H, W] (the grid is H, W over the patch size); Flux takes packed tokens
    [B, N, C] with their positions in ``img_ids`` (row, column), from which the grid is read. ``memo`` keeps the grid
    of the last ``img_ids`` seen (a pipeline passes the same tensor at every step)."""
    hs = kwargs.get("hidden_states", args[0] if args else None)
    ehs = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    t = kwargs.get("timestep")
    if hs.ndim == 4:
        p = latent_per_cell(denoiser)
        grid = (int(hs.shape[-2]) // p, int(hs.shape[-1]) // p)
    else:
        ids = kwargs.get("img_ids")
        if ids is None:
            raise AuditorError(f"{type(denoiser).__name__} was called without img_ids: the patch grid is unknown")
        known = None if memo is None else memo.get("img_ids")
        if known is not None and known[0] is ids and known[1] == ids._version:
            grid = known[2]
        else:
            rows = ids[0] if ids.ndim == 3 else ids
            grid = (int(rows[:, 1].max()) + 1, int(rows[:, 2].max()) + 1)
            if memo is not None:  # the tensor itself is kept, so identity cannot be a freed tensor's reused id
                memo["img_ids"] = (ids, ids._version, grid)
        if grid[0] * grid[1] != int(hs.shape[1]):
            raise AuditorError(f"img_ids describe a {grid[0]}x{grid[1]} grid, not the {int(hs.shape[1])} image tokens")
    text_len = None if ehs is None else int(ehs.shape[1])
    if torch.is_tensor(t):
        t = float(t.flatten()[0]) if t.numel() else None
    return hs, grid, text_len, (None if t is None else float(t))


def processor_for(name: str, module, proc):
    """A factory ``(tap, layer_index) -> processor`` for a joint or single-stream module, or None for a plain
    cross-attention module (recorded by ``capture_cross._TapProcessor``); an AuditorError for a processor whose
    computation the capture does not reproduce."""
    kind = joint_kind(name, module)
    if kind is None:
        return None
    have = type(proc).__name__
    flux = type(module).__name__ == "FluxAttention"
    allowed = FLUX_PROCESSORS if flux else SD3_PROCESSORS
    if have not in allowed:
        raise AuditorError(f"cannot trace {name}: its attention processor {have} is not the stock joint attention "
                           f"(supported: {', '.join(sorted(allowed))})")
    if flux:
        return lambda tap, i: _FluxTapProcessor(tap, i, proc)
    return lambda tap, i: _JointTapProcessor(tap, i, proc)


def _sdpa(q, k, v, mask, items: slice, rows: slice = slice(None)) -> torch.Tensor:
    """SDPA for batch ``items`` and query ``rows`` of a joint sequence (each query row's softmax is its own)."""
    m = None
    if mask is not None:
        m = mask[items] if mask.shape[0] == q.shape[0] else mask
        m = m[:, :, rows] if m.shape[2] == q.shape[2] else m
    return F.scaled_dot_product_attention(q[items, :, rows], k[items], v[items], attn_mask=m, dropout_p=0.0,
                                          is_causal=False)


def joint_attention(tap, layer_index: int, attn, q, k, v, mask, image: slice, text: slice) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d) + mask) V over one joint sequence ([B, heads, S, d] each), as SDPA computes it; the
    tap's recorded items' image queries (``image`` rows) shown with their probabilities on the ``text`` keys.

    Where SDPA runs CPU flash attention, the output is that kernel's and the recorded probabilities are the text
    scores normalised by its log-sum-exp (``_record_from_lse``). Elsewhere the recorded rows are computed explicitly
    (their probabilities reused for probs @ V) and every other query goes through SDPA as the stock processor
    sends it."""
    batch, heads, s = q.shape[:3]
    scale = q.shape[-1] ** -0.5  # SDPA's default, which both stock processors use
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    seen = tap.observer(layer_index, attn)
    if seen is None:
        return _sdpa(q, k, v, mask, slice(None))
    n = image.stop - image.start
    lo = min(max(int(tap.first_cond), 0), batch)
    rec = slice(lo, batch)
    if not tap.needs_probs:
        if lo < batch:
            seen(q[rec, :, image], None, slice(0, n), n)
        return _sdpa(q, k, v, mask, slice(None))
    if lo == batch:
        return _sdpa(q, k, v, mask, slice(None))
    rec_mask = None
    if mask is not None:
        rec_mask = mask[rec] if mask.shape[0] == batch else mask
        rec_mask = rec_mask[:, :, image] if rec_mask.shape[2] == s else rec_mask
    fused = _sdpa_with_lse(q, k, v, mask)
    if fused is not None:
        out, lse = fused
        if rec_mask is None and tap.sums_only and _defer(tap, layer_index, attn, q, k, lse, rec, image, text, scale):
            return out
        _record_from_lse(tap, seen, q[rec, :, image], k[rec, :, text], lse[rec, :, image],
                         None if rec_mask is None else rec_mask[..., text], scale)
        return out

    def observe(qb, probs, rows: slice, _n: int) -> None:
        seen(qb, probs[:, :, :, text], rows, n)

    shown = _explicit(q[rec, :, image], k[rec], v[rec], rec_mask, scale, observe).to(q.dtype)
    out = torch.empty_like(q)
    out[rec, :, image] = shown
    if lo:
        out[:lo, :, image] = _sdpa(q, k, v, mask, slice(0, lo), image)
    # the text queries: SD3 puts them after the image tokens, Flux before
    others = slice(image.stop, s) if image.start == 0 else slice(0, image.start)
    if others.stop > others.start:
        out[:, :, others] = _sdpa(q, k, v, mask, slice(None), others)
    return out


_FLASH_CHOICE: dict = {}  # (shapes, dtype, mask layout) -> whether SDPA picks CPU flash attention: asked once


def _sdpa_with_lse(q, k, v, mask) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(SDPA's output, each query's log-sum-exp over all keys) from the very kernel ``F.scaled_dot_product_attention``
    dispatches to, or None where that kernel is not CPU flash attention (the only one whose log-sum-exp this code
    reads; elsewhere the caller computes the recorded rows explicitly)."""
    if q.device.type != "cpu":
        return None
    key = (q.shape, k.shape, q.stride(), k.stride(), v.stride(), q.dtype,
           None if mask is None else (mask.shape, mask.stride(), mask.dtype))
    flash = _FLASH_CHOICE.get(key)
    if flash is None:
        flash = _FLASH_CHOICE[key] = torch._fused_sdp_choice(q, k, v, attn_mask=mask) == FLASH
    if not flash:
        return None
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask)


def _record_from_lse(tap, seen, q, k_text, lse, mask, scale: float) -> None:
    """Show ``seen`` the image queries' probabilities on the tap's kept text keys: exp(q k^T * scale + mask - lse),
    with ``lse`` the log-sum-exp over all keys (the model's normalisation), without scoring the image keys or the
    text keys the tap does not keep."""
    total = k_text.shape[2]
    runs = tap.columns_for(total)
    if runs is not None:
        k_text = take(k_text, runs, 2)
        mask = None if mask is None else take(mask, runs, -1)
    batch, heads, n = q.shape[:3]
    t = k_text.shape[2]
    # [items * heads, ...] views (a copy only where the layout needs one)
    kt = k_text.float().reshape(batch * heads, t, -1).transpose(1, 2)
    qf, lse = q.float().reshape(batch * heads, n, -1), lse.float().reshape(batch * heads, n, 1)
    step = n if 4 * batch * heads * n * t <= CPU_BLOCK_BYTES else block_rows(q.device, batch, heads, n, t)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        if mask is None:
            probs = text_probs(qf[:, rows], kt, lse[:, rows], scale).view(batch, heads, -1, t)
        else:
            bias = (mask if mask.shape[2] == 1 else mask[:, :, rows]).float()
            scores = torch.baddbmm(lse[:, rows], qf[:, rows], kt, beta=-1, alpha=scale).view(batch, heads, -1, t)
            probs = scores.add_(bias).exp_()
        seen(q[:, :, rows], probs, rows, n, total)


def text_probs(q: torch.Tensor, kt: torch.Tensor, lse: torch.Tensor, scale: float) -> torch.Tensor:
    """exp(q k^T * scale - lse): queries' probabilities on some keys, normalised by their log-sum-exp over all keys.

    Args:
        q: [N, n, d] queries (float32).
        kt: [N, d, t] the keys kept, transposed.
        lse: [N, n, 1] each query's log-sum-exp over every key of its softmax.
        scale: the softmax scale.

    Returns:
        [N, n, t] probabilities (one ``baddbmm`` and an in-place ``exp``)."""
    return torch.baddbmm(lse, q, kt, beta=-1, alpha=scale).exp_()


# A joint-attention call whose probabilities on the kept text columns take fewer bytes than this waits, and a
# generation's waiting calls are scored together (``PendingCalls``): at such sizes each tensor operation's fixed cost,
# not its arithmetic, is what recording costs, so one batched product over many calls beats one per call. Larger
# calls are scored at once, in cache-sized query blocks. The batched products are cache-sized too (CPU_BLOCK_BYTES).
DEFER_SCORE_BYTES = CPU_BLOCK_BYTES // 8
DEFER_TOTAL_BYTES = 64 << 20  # waiting calls are scored at once when the tensors they hold pass this


def _defer(tap, layer_index: int, attn, q, k, lse, rec: slice, image: slice, text: slice, scale: float) -> bool:
    """Hand a small call to the tap's ``PendingCalls`` (True), or leave a large one to be recorded now (False).

    Runs at every layer call, so it does as little as it can: a layer's first call of a generation decides for the
    layer's later ones (their shapes are the same), and the call is kept as it came, sliced only when scored."""
    pending = tap.pending
    if pending is None:
        pending = tap.pending = PendingCalls()
    held = pending.layer_bytes.get(layer_index)
    if held is None:
        held = pending.layer_bytes[layer_index] = _waiting_bytes(tap, q, k, lse, rec, image, text)
        if held:  # read before the calls are scored (maps ask for a layer's grid first): this generation's grid
            n = image.stop - image.start
            tap.grids[tap.head_index.layers[layer_index]] = layer_grid(tap.latent_size, n)
    if not held:
        return False
    pending.calls.append((layer_index, attn, q, k, lse, rec.start, image, text, scale))
    pending.nbytes += held
    if pending.nbytes > DEFER_TOTAL_BYTES:
        pending.flush(tap)
    return True


def _waiting_bytes(tap, q, k, lse, rec: slice, image: slice, text: slice) -> int:
    """The bytes a call of this layer holds while it waits (its queries, keys and log-sum-exps), or 0 when its
    probabilities on the kept columns are too large to wait or it is not on the CPU."""
    runs = tap.columns_for(text.stop - text.start)  # (a column past the sequence is refused here, during the call)
    kept = text.stop - text.start if runs is None else sum(r.stop - r.start for r in runs)
    n = image.stop - image.start
    if q.device.type != "cpu" or (q.shape[0] - rec.start) * q.shape[1] * n * kept * 4 > DEFER_SCORE_BYTES:
        return 0
    return (q.numel() + k.numel() + lse.numel()) * q.element_size()


class PendingCalls:
    """Joint-attention calls of a tap that only sums probabilities (``Tap.sums_only``), scored later together.

    Each call is kept as the processor had it (queries, keys and log-sum-exps of the whole joint sequence, with the
    recorded items' and image queries' slices; ``nbytes`` counts the tensors held). ``flush`` groups the calls by
    shape, stacks the recorded slices a cache-sized chunk at a time, computes their probabilities on the kept text
    columns in one ``text_probs`` per chunk, adds them into one sum per layer and shows each layer's sum to the tap
    once, as one call would. The sums equal those of recording each call at once (up to float32 rounding of the
    order of addition)."""

    def __init__(self):
        # a call: (layer index, module, q, k, lse, first recorded item, image slice, text slice, scale)
        self.calls: list[tuple] = []
        self.nbytes = 0
        self.layer_bytes: dict[int, int] = {}  # per layer: what a call holds while waiting, 0 when it does not wait

    def clear(self) -> None:
        """Forget the waiting calls and the layers' decisions (a new generation starts)."""
        self.calls, self.nbytes, self.layer_bytes = [], 0, {}

    def flush(self, tap) -> None:
        """Score every waiting call and show the tap each layer's sum."""
        calls, self.calls, self.nbytes = self.calls, [], 0
        groups: dict[tuple, list] = {}
        for c in calls:
            _, _, q, k, _, lo, image, text, scale = c  # as ``_defer`` keeps it
            key = (q.shape, k.shape, lo, image.start, image.stop, text.start, text.stop, scale)
            groups.setdefault(key, []).append(c)
        for group in groups.values():
            self._score(tap, group)

    @staticmethod
    def _score(tap, calls: list[tuple]) -> None:
        """One shape's calls: their probabilities summed per layer and shown to the tap."""
        _, _, q0, _, _, lo, image, text, scale = calls[0]
        total = text.stop - text.start
        runs = tap.columns_for(total) or (slice(0, total),)
        b, h, n, d = q0.shape[0] - lo, q0.shape[1], image.stop - image.start, q0.shape[3]
        t = sum(r.stop - r.start for r in runs)
        attns = {c[0]: c[1] for c in calls}  # layer -> its module, layers in the order they ran
        position = {layer_index: j for j, layer_index in enumerate(attns)}
        sums = torch.zeros((len(attns), b, h, n, t), dtype=torch.float32, device=q0.device)
        chunk = max(1, CPU_BLOCK_BYTES // (4 * b * h * n * t))
        for start in range(0, len(calls), chunk):
            part = calls[start:start + chunk]
            q = torch.stack([c[2][lo:, :, image] for c in part]).float()  # [calls, items, heads, n, d]
            lse = torch.stack([c[4][lo:, :, image] for c in part]).float()
            # each run of kept columns stacked alone (a text sequence is mostly padding: never copy all of it)
            k = torch.cat([torch.stack([c[3][lo:, :, text.start + r.start:text.start + r.stop] for c in part])
                           for r in runs], 3)
            probs = text_probs(q.reshape(-1, n, d), k.float().reshape(-1, t, d).transpose(1, 2),
                               lse.reshape(-1, n, 1), scale).view(len(part), b, h, n, t)
            where = torch.tensor([position[c[0]] for c in part], device=sums.device)
            sums.index_add_(0, where, probs)
        for j, (layer_index, attn) in enumerate(attns.items()):
            tap.show(layer_index, attn, None, sums[j], slice(0, n), n, total)


class _JointTapProcessor:
    """SD3's joint attention (``JointAttnProcessor2_0``'s computation), image queries' text probabilities recorded."""

    is_tap = True

    def __init__(self, tap, layer_index: int, stock):
        self.tap, self.layer_index, self.stock = tap, layer_index, stock

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if encoder_hidden_states is None:  # not a text-reading call: nothing to record
            return self.stock(attn, hidden_states, None, attention_mask, *args, **kwargs)
        batch, n_image = hidden_states.shape[:2]

        def heads(x):
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        eq, ek = heads(attn.add_q_proj(encoder_hidden_states)), heads(attn.add_k_proj(encoder_hidden_states))
        ev = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            eq = attn.norm_added_q(eq)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        q, k, v = torch.cat([q, eq], dim=2), torch.cat([k, ek], dim=2), torch.cat([v, ev], dim=2)
        out = joint_attention(self.tap, self.layer_index, attn, q, k, v, None, slice(0, n_image),
                              slice(n_image, k.shape[2]))
        out = out.transpose(1, 2).reshape(batch, -1, q.shape[1] * q.shape[-1]).to(q.dtype)
        hidden, context = out[:, :n_image], out[:, n_image:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        hidden = attn.to_out[1](attn.to_out[0](hidden))
        return hidden, context


class _FluxTapProcessor:
    """Flux's attention (``FluxAttnProcessor``'s computation, rotary embeddings included), double- or single-stream,
    image queries' text probabilities recorded."""

    is_tap = True

    def __init__(self, tap, layer_index: int, stock):
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        self.tap, self.layer_index, self.stock = tap, layer_index, stock
        self.rotate, self.projections = apply_rotary_emb, _get_qkv_projections  # the stock processor's own steps

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        query, key, value, eq, ek, ev = self.projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        double = attn.added_kv_proj_dim is not None
        if double:
            eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
            ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
            ev = ev.unflatten(-1, (-1, attn.head_dim))
            query, key, value = torch.cat([eq, query], 1), torch.cat([ek, key], 1), torch.cat([ev, value], 1)
            n_text = int(encoder_hidden_states.shape[1])
        else:
            n_text = self.tap.text_len
            if n_text is None:
                raise AuditorError("a single-stream block ran before the transformer's text length was seen")
        if image_rotary_emb is not None:
            query = self.rotate(query, image_rotary_emb, sequence_dim=1)
            key = self.rotate(key, image_rotary_emb, sequence_dim=1)
        s = query.shape[1]
        out = joint_attention(self.tap, self.layer_index, attn, query.transpose(1, 2), key.transpose(1, 2),
                              value.transpose(1, 2), attention_mask, slice(n_text, s), slice(0, n_text))
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        context, hidden = out.split_with_sizes([n_text, s - n_text], dim=1)
        hidden = attn.to_out[1](attn.to_out[0](hidden.contiguous()))
        return hidden, attn.to_add_out(context.contiguous())
