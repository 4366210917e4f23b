"""The shapes grammar is pinned: the bundled models' relevance calibration and the benchmarks were made from its
prompts, so the same seed must keep giving the same prompts, words and scenes."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from auditor.zoo.grammar import sample, sample_prompts


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("seed, split, expected", [
    (0, "train", "998557bf3273a389dc27d0a1196e1d81ed42296dcc25ee02a9e0fdbc6aeb1b8c"),
    (3, "heldout", "f28bae931fdf55a0cba23d3ee3959e6cee2204183c0f6a2f512cb518cc91b7c5"),
])
def test_calibration_prompts_are_pinned(seed, split, expected):
    assert _sha("\n".join(sample_prompts(500, seed, split))) == expected


@pytest.mark.parametrize("split, defects, expected", [
    ("train", True, "83edccf03921b25d1ab7212b3949a960495c58dc57bf25bd20f48aaab17d81b8"),
    ("heldout", False, "f01b93b936e93804bedda3c836db7b48e84e55ad7302e80acb5da372ee17bc23"),
])
def test_samples_are_pinned(split, defects, expected):
    """Prompt, kind, word spans, planted defects and the drawn objects of 200 samples from one generator."""
    rng = np.random.default_rng(11)
    rows = []
    for _ in range(200):
        s = sample(rng, split, defects)
        rows.append((s.prompt, s.kind, s.defects,
                     [(m.noun, sorted(m.attributes.items()), m.position_named) for m in s.mentions],
                     [(o.shape, o.colour, o.size, o.texture, o.position) for o in s.scene.objects]))
    assert _sha(repr(rows)) == expected
