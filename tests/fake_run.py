"""A realistic run folder without a model: the store, report and compare tests build on it.

It goes through the same ``RunStore`` calls the runner makes, with small random images, Gaussian-blob concept maps,
overlays, flags drawn at a chosen rate (or forced per concept to plant a regression), a manifest shaped like a real
one and a relevance matrix over a shapes-world-sized UNet (7 cross-attention layers x 8 heads).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from auditor.store import RunStore, manifest_base
from auditor.summary import summarise

# (prompt_id, text, concepts): concept = (text, role, category, binds_to index or None)
PROMPTS = [
    ("two-objects", "a red cube and a blue ball",
     [("cube", "object", "shape", None), ("red", "attribute", "colour", 0),
      ("ball", "object", "shape", None), ("blue", "attribute", "colour", 2)]),
    ("polysemy", "an orange next to an orange sphere",
     [("orange", "object", "fruit", None), ("orange", "attribute", "colour", 2), ("sphere", "object", "shape", None)]),
    ("hostile-text", "<script>alert(1)</script> a green star & a \"striped\" ring",
     [("star", "object", "shape", None), ("green", "attribute", "colour", 0), ("ring", "object", "shape", None),
      ("striped", "attribute", "texture", 2)]),
]
TAGS = {"two-objects": ["pair", "binding"], "polysemy": ["pair", "polysemy"], "hostile-text": ["pair"]}
# A prompt whose categories have no calibrated heads (not in CATEGORIES): the runner falls back to the all-heads map
# for them and records no selective map, with a note. Only the report tests use it.
FALLBACK_PROMPT = ("no-heads", "a shiny wheel on the left",
                   [("wheel", "object", "vehicle", None), ("shiny", "attribute", "material", 0)])
CATEGORIES = ["colour", "shape", "texture", "fruit", "position"]
POLYSEMOUS = {"orange": ("colour", "fruit")}  # words with several readings get a category_response
LAYERS = ["down_blocks.0.attentions.0", "down_blocks.1.attentions.0", "mid_block.attentions.0",
          "up_blocks.0.attentions.0", "up_blocks.0.attentions.1", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1"]
HEAD_NAMES = [f"{layer}.transformer_blocks.0.attn2#h{j}" for layer in LAYERS for j in range(8)]
METHODS = ("selective", "all_heads")
MESSAGES = {
    "missing": "'{t}': its {c} heads find no region of its own",
    "misplaced": "'{t}': its {c} heads put most of its attention on another object",
    "misinterpreted": "'{t}' reads as another category, not {c}",
}
VERDICTS = {
    "missing": "the object is probably not drawn",
    "misplaced": "the {c} probably went to another object",
    "misinterpreted": "the model may have misread the word",
}


def blob(rng: np.random.Generator, size: int) -> np.ndarray:
    """A normalised Gaussian blob at a random place: what a well-localised concept map looks like."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    cx, cy, s = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.2)
    m = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s * s))
    return (m / m.max()).astype(np.float32)


def overlay(image: Image.Image, m: np.ndarray) -> Image.Image:
    heat = np.stack([m, m ** 2, 1 - m], axis=-1) * 255
    over = Image.fromarray(heat.astype(np.uint8)).resize(image.size)
    return Image.blend(image.convert("RGB"), over, 0.5).resize((128, 128), Image.NEAREST)


def relevance(shift: float = 0.0, base_seed: int = 7, n_categories: int = len(CATEGORIES)) -> np.ndarray:
    """Each category owns a few heads strongly; ``shift`` moves relevance mass to other heads (a fine-tune).
    Its own generators: a shifted matrix leaves the rest of the fake run unchanged."""
    base, rng = np.random.default_rng(base_seed), np.random.default_rng(base_seed + 1)
    m = base.random((n_categories, len(HEAD_NAMES))) * 0.2
    for i in range(n_categories):
        m[i, base.choice(len(HEAD_NAMES), 6, replace=False)] += 1.0
    if shift:
        m = (1 - shift) * m + shift * rng.random(m.shape) * 1.2
    return m / m.sum(1, keepdims=True)


def build(run_dir: Path, *, seed: int = 0, seeds=(0, 1, 2), flag_rate: float = 0.2, forced=None,
          prompts=PROMPTS, suite_name: str = "fake-suite", relevance_shift: float = 0.0, with_relevance: bool = True,
          acceptance: dict | None = None, finish: bool = True, size: int = 32, categories=CATEGORIES) -> Path:
    """Write a run folder. ``forced`` maps (prompt_id, concept text) -> flag probability, overriding ``flag_rate``
    (1.0 plants a concept that is flagged in every seed, 0.0 one that never is). ``categories``: those the model
    has calibrated heads for (the relevance matrix's rows); concepts of other categories get the all-heads map."""
    rng = np.random.default_rng(seed)
    forced = forced or {}
    manifest = {
        **manifest_base(["auditor", "audit", "fake-suite.yaml"]),
        "model": {"name": "shapes-fake", "id": "fake/shapes", "path": "/nonexistent", "fingerprint": f"fp{seed:04d}"},
        "device": "cpu", "dtype": "float32",
        "suite": {"name": suite_name, "path": f"prompt_suites/{suite_name}.yaml", "sha256": "ab" * 32,
                  "prompt_ids": [p[0] for p in prompts],
                  "acceptance": acceptance if acceptance is not None else
                  {"max_flag_rate": {"any": 0.5, "missing": 0.3}, "required_categories": ["colour", "shape"]}},
        "seeds": list(seeds), "steps": 20, "guidance": 7.5, "resolution": [size, size],
        "thresholds": {"min_peak_ratio": 0.25, "min_binding_margin": -0.1, "max_flag_rate": 0.5, "k": 8},
        "relevance": {"hash": "cd" * 32, "budget": 120}, "method": {"k": 8},
    }
    store = RunStore.create(run_dir, manifest)
    if with_relevance:
        store.save_relevance(list(categories), HEAD_NAMES, relevance(relevance_shift, n_categories=len(categories)))
    for pid, text, concepts in prompts:
        for s in seeds:
            image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
            maps, overlays, records = {}, {}, []
            for i, (word, role, cat, binds) in enumerate(concepts):
                # Every draw happens whether or not it is used, so a forced concept changes nothing else in the run.
                draw, severity, peak, conc = rng.random(), int(rng.integers(0, 3)), rng.random(), rng.random()
                flags = []
                if draw < forced.get((pid, word), flag_rate):
                    ftype = "missing" if role == "object" else "misplaced"
                    verdict = VERDICTS[ftype].format(c=cat)
                    flags.append({"type": ftype, "severity": ["low", "medium", "high"][severity],
                                  "message": MESSAGES[ftype].format(t=word, c=cat) + " — " + verdict,
                                  "verdict": verdict})
                method = "selective" if cat in categories else "all_heads"
                rec = {"id": i, "text": word, "lemma": word, "role": role, "category": cat,
                       "category_source": "lexicon", "binds_to": binds, "token_indices": [i + 2], "flags": flags,
                       "map_method": method,
                       "scores": {"peak": round(float(peak), 4),
                                  "concentration": round(0.1 + 0.2 * conc if flags else 0.6 + 0.3 * conc, 4)}}
                if method != "selective":
                    rec["note"] = f"no calibrated heads for category {cat!r}: verdicts use the all-heads map"
                if word in POLYSEMOUS:  # no draw from rng: the rest of the run stays the same
                    rec["category_response"] = {c: round(0.01 + 0.004 * (c == cat) + 0.001 * s, 6)
                                                for c in POLYSEMOUS[word]}
                if pid == FALLBACK_PROMPT[0] and role == "object":
                    rec["position"] = "left"
                records.append(rec)
                for m_name in METHODS:
                    m = blob(rng, size)
                    if m_name == "selective" and method != "selective":
                        continue  # the runner records no selective map for a category without heads
                    maps[f"{i}_{m_name}"] = m
                    overlays[f"{i}_{m_name}"] = overlay(image, m)
            store.add_generation({"prompt_id": pid, "prompt": text, "seed": s, "tags": TAGS.get(pid, []),
                                  "concepts": records},
                                 image, maps, overlays)
    if finish:
        store.finish(summarise(store.generations(), manifest["suite"]["acceptance"], 0.5))
    store.close()
    return Path(run_dir)
