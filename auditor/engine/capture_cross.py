"""The cross-attention processor: a UNet's or PixArt's ``attn2`` computed as the stock processor computes it, its
probabilities shown to a tap (``auditor.engine.capture.Tap``) on the way.

``attend`` reproduces diffusers' plain attention processors (the same norms, mask, residual and rescale handling)
with the probabilities of the recorded batch items computed explicitly, in query blocks that stay in cache, and
reused for probs @ V; every other item goes through SDPA as the stock processor sends it.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

# Processors whose output is plain scaled-dot-product attention, so the explicit computation below reproduces it.
# Others (IP-Adapter, custom) take extra inputs the capture would silently drop, so tracing refuses them.
PLAIN_PROCESSORS = frozenset({"AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor", "SlicedAttnProcessor",
                              "AttnProcessorNPU", "FusedAttnProcessor2_0", "XLAFlashAttnProcessor2_0",
                              "AttnProcessorXFormers"})

# observe(query rows [items, heads, r, d], probs rows [items, heads, r, T] or None, rows: slice of the layer's N
# queries, N[, total: given when the probs hold only the tap's kept columns]), for the recorded items only
Observer = Callable[..., None]

CPU_BLOCK_BYTES = 2 << 20  # on CPU, scores are computed in query blocks of about this size (see block_rows)


def block_rows(device: torch.device, batch: int, heads: int, n: int, tokens: int) -> int:
    """Queries per block. On CPU, a whole layer's [batch, heads, N, T] scores (10 MB at SD's 64x64 layers) fall out
    of cache between matmul, softmax and probs @ V; blocks that fit run about twice as fast. GPUs want one block."""
    if device.type != "cpu":
        return n
    return max(64, CPU_BLOCK_BYTES // (4 * batch * heads * tokens))


# Below this many score entries in the unrecorded items, computing them explicitly too is cheaper than a separate
# SDPA call for them (a tiny layer's cost is the number of operations, not arithmetic).
SPLIT_MIN_SCORES = 1 << 18


def _explicit(q, k, v, mask, scale: float, observe: Observer | None, first_recorded: int = 0) -> torch.Tensor:
    """softmax(Q K^T * scale + mask) @ V in query blocks; items from ``first_recorded`` on shown to ``observe``."""
    # Scores and softmax in float32 whatever the model dtype: the sums we keep must not lose the small
    # probabilities, and SDPA's fused kernels accumulate in float32 as well. (The scale goes on the T x d keys
    # rather than the N x T scores: same result, far fewer multiplications.)
    kt = k.float().transpose(-1, -2) * scale
    batch, heads, n = q.shape[:3]
    step = block_rows(q.device, batch, heads, n, kt.shape[-1])
    outs = []
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        qb = q if step >= n else q[:, :, rows]
        scores = torch.matmul(qb.float(), kt)
        if mask is not None:
            scores = scores + (mask if mask.shape[2] == 1 else mask[:, :, rows]).float()
        probs = scores.softmax(dim=-1)
        if observe is not None:
            lo = first_recorded
            observe(qb[lo:] if lo else qb, probs[lo:] if lo else probs, rows, n)
        outs.append(torch.matmul(probs.to(v.dtype), v))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def attend(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
           observe: Observer | None = None, first_recorded: int = 0, need_probs: bool = True) -> torch.Tensor:
    """The stock attention computation; batch items from ``first_recorded`` on are shown to ``observe``.

    Recorded items get explicit probabilities (computed once, reused for probs @ V) when ``need_probs``; every
    other item, and every item of an unobserved call, goes through SDPA exactly as the stock processor does."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
    batch, seq_len = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape[:2]
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)

    head_dim = key.shape[-1] // attn.heads
    q = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    k = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    v = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)

    def sdpa(sl: slice) -> torch.Tensor:
        m = None if attention_mask is None else attention_mask[sl]
        # attn.scale is SDPA's default 1/sqrt(d) unless the module was built with scale_qk=False, whose stock
        # (non-SDPA) processor uses attn.scale too
        return F.scaled_dot_product_attention(q[sl], k[sl], v[sl], attn_mask=m, dropout_p=0.0, is_causal=False,
                                              scale=attn.scale)

    lo = min(max(int(first_recorded), 0), batch)
    if observe is None or not need_probs:
        out = sdpa(slice(None))
        if observe is not None and lo < batch:
            observe(q[lo:], None, slice(0, q.shape[2]), q.shape[2])
    elif lo == 0 or lo * attn.heads * q.shape[2] * k.shape[2] < SPLIT_MIN_SCORES:
        out = _explicit(q, k, v, attention_mask, attn.scale, observe, lo)
    else:  # unrecorded items (the unconditional half) through SDPA, recorded ones explicitly
        mask = None if attention_mask is None else attention_mask[lo:]
        rec = _explicit(q[lo:], k[lo:], v[lo:], mask, attn.scale, observe)
        out = torch.cat([sdpa(slice(0, lo)), rec.to(q.dtype)], dim=0)
    out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
    out = attn.to_out[0](out)
    out = attn.to_out[1](out)
    if input_ndim == 4:
        out = out.transpose(-1, -2).reshape(batch, channel, height, width)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


class _TapProcessor:
    """The attn2 processor installed while tapping: stock output, probabilities shown to the tap."""

    is_tap = True

    def __init__(self, tap, layer_index: int):
        self.tap, self.layer_index = tap, layer_index

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        tap = self.tap
        return attend(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                      observe=tap.observer(self.layer_index, attn), first_recorded=tap.first_cond,
                      need_probs=tap.needs_probs)
