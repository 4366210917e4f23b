"""all_heads is DAAM's default aggregation, exactly (castorini/daam 0.2.0).

``daam_reference`` re-derives DAAM's computation the way its code is organised: a collection of step-summed raw maps
keyed by (layer, head) for the hooked layers only, each [tokens, h, w] map upsampled bicubically to the latent grid
and clamped at 0, the mean over the collection, a word = the mean of its tokens' maps, ``expand_as`` = bicubic to
the image and min-max with DAAM's 1e-8. The pinned numbers were computed once from that derivation; the engine must
reproduce both.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from auditor.engine import maps as M
from auditor.engine.heads import HeadIndex

LAYERS = (  # (name, heads, grid): the mid block must be left out, two resolutions must be upsampled
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn2", 2, (8, 8)),
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn2", 3, (4, 4)),
    ("mid_block.attentions.0.transformer_blocks.0.attn2", 2, (2, 2)),
    ("up_blocks.0.attentions.0.transformer_blocks.0.attn2", 3, (4, 4)),
    ("up_blocks.1.attentions.0.transformer_blocks.0.attn2", 2, (8, 8)),
)
TOKENS, STEPS = 6, 3


class _Trace:
    """What the map functions read from a ``Trace``: buffers [items, heads, h*w, T] summed over counted steps."""

    def __init__(self, buffers, grids):
        self.head_index = HeadIndex(tuple(n for n, _, _ in LAYERS), tuple(h for _, h, _ in LAYERS))
        self.head_names = self.head_index.names
        self.buffers, self.grids = buffers, grids
        self.latent_size, self.image_size, self.steps_counted = (8, 8), (16, 16), STEPS

    def column(self, token: int) -> int:
        return int(token)


def synthetic_trace() -> _Trace:
    rng = np.random.default_rng(7)
    buffers, grids = {}, {}
    for name, heads, (h, w) in LAYERS:
        steps = []
        for _ in range(STEPS):  # each step a softmax over the text columns, with sharp spots to make bicubic overshoot
            logits = rng.normal(0, 2.0, size=(1, heads, h * w, TOKENS))
            p = np.exp(logits)
            steps.append(p / p.sum(-1, keepdims=True))
        buffers[name] = torch.tensor(np.sum(steps, 0), dtype=torch.float32)
        grids[name] = (h, w)
    return _Trace(buffers, grids)


def daam_reference(tr: _Trace, word_tokens, image_hw) -> np.ndarray:
    collection = {}  # (layer, head) -> step-summed [tokens, h, w], as DAAM's RawHeatMapCollection holds them
    for layer, (name, heads, (h, w)) in enumerate(LAYERS):
        if name.startswith("mid_block"):
            continue  # DAAM's default locator does not hook the mid block
        buf = tr.buffers[name][0]
        for head in range(heads):
            collection[(layer, head)] = buf[head].T.reshape(TOKENS, h, w)
    merged = [F.interpolate(m.unsqueeze(1), size=tr.latent_size, mode="bicubic").clamp_(min=0)
              for m in collection.values()]
    maps = torch.stack(merged, 0).mean(0)[:, 0]  # [tokens, H, W]
    word = maps[list(word_tokens)].mean(0)
    im = F.interpolate(word[None, None], size=image_hw, mode="bicubic")
    im = (im - im.min()) / (im.max() - im.min() + 1e-8)
    return im[0, 0].numpy()


# Computed once from daam_reference (every fifth pixel of the 16x16 map of tokens 2 and 3).
PINNED = np.array([
    [0.392363, 0.348401, 0.455778, 0.208977],
    [0.646794, 0.930771, 0.292838, 0.423754],
    [0.403549, 0.130687, 0.793207, 0.439937],
    [0.318911, 0.232872, 0.444527, 0.288741],
])
PINNED_SUM = 121.89317


def test_all_heads_is_daams_default_aggregation():
    tr = synthetic_trace()
    cm = M.concept_map(tr, (2, 3), "all_heads")
    ref = daam_reference(tr, (2, 3), (16, 16))
    np.testing.assert_allclose(cm.norm, ref, atol=2e-6)
    np.testing.assert_allclose(cm.norm[::5, ::5], PINNED, atol=2e-6)
    assert abs(float(cm.norm.sum()) - PINNED_SUM) < 1e-3
    # the heads used: every head but the mid block's
    assert len(cm.heads) == 10 and not any(tr.head_names[h].startswith("mid_block") for h in cm.heads)


def test_the_clamp_acts_where_bicubic_undershoots():
    # without the clamp the map differs: the synthetic maps are sharp enough for bicubic to go below 0
    tr = synthetic_trace()
    name, _, (h, w) = LAYERS[1]
    x = tr.buffers[name][0].permute(0, 2, 1).reshape(-1, 1, h, w)
    assert float(F.interpolate(x, size=(8, 8), mode="bicubic").min()) < 0


def test_the_mid_block_changes_nothing_and_a_word_is_the_mean_of_its_tokens():
    tr = synthetic_trace()
    before = M.concept_map(tr, (2, 3), "all_heads").raw
    tr.buffers[LAYERS[2][0]] = tr.buffers[LAYERS[2][0]] * 50.0
    np.testing.assert_array_equal(M.concept_map(tr, (2, 3), "all_heads").raw, before)
    one = [M.concept_map(tr, (t,), "all_heads", size="latent").raw for t in (2, 3)]
    np.testing.assert_allclose(M.concept_map(tr, (2, 3), "all_heads", size="latent").raw, (one[0] + one[1]) / 2,
                               rtol=1e-5, atol=1e-7)
