"""One prompt, end to end (the `auditor maps` command): generate under trace (or read a given image), map each
concept by each method, and draw the maps over the image. A client of the engine: the concepts come from ``auditor.concepts``, the maps from
``auditor.engine.maps``; pictures are drawn here and in the run store's overlays (``overlay``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from auditor.align import text_sequence, word_indices
from auditor.concepts import VISIBLE_ROLES, extract
from auditor.engine.families import call_kwargs
from auditor.engine.image_read import load_image
from auditor.engine.maps import METHODS, ConceptMap, concept_map
from auditor.engine.trace import trace, trace_image
from auditor.engine.categories import category_of
from auditor.errors import AuditorError


@dataclass
class ConceptMaps:
    text: str
    category: str | None
    category_source: str  # "lexicon" | "override" | "inferred" | "none"
    token_indices: tuple[int, ...]
    maps: dict[str, ConceptMap] = field(default_factory=dict)  # method -> map


@dataclass
class PromptMaps:
    prompt: str
    seed: int
    steps: int
    image: object  # PIL.Image
    concepts: list[ConceptMaps]
    relevance_sha256: str | None = None
    reading: object = None  # an ImageReading when the maps were read from a given image, not generated


def prompt_concepts(prompt: str, pipe, words: Sequence[str] | None = None, relevance=None) -> list[ConceptMaps]:
    """The concepts to map: ``words`` if given, else the prompt's concepts the lexicon knows.

    Concepts come from ``auditor.concepts.extract`` (role-aware categories: "orange" as a modifier is a colour)."""
    tokens = text_sequence(pipe)  # the columns the denoiser reads (a transformer's are not one tokenizer's)
    extracted = extract(prompt, tokens)
    shown = prompt if len(prompt) <= 40 else prompt[:40] + "..."
    extracted.refuse_if_truncated(f"prompt {shown!r}", tokens)
    found = list(extracted.items)
    cats = relevance.category_limit if relevance is not None else None
    out: list[ConceptMaps] = []
    if words:
        for w in words:
            try:
                idx = word_indices(prompt, w, tokens).indices
            except KeyError as exc:
                raise AuditorError(f"--concept {w!r}: {exc.args[0]}") from None
            known = next((c for c in found if c.text.lower() == w.lower() and c.category != "unknown"), None)
            if known is not None and (cats is None or known.category in cats):
                out.append(ConceptMaps(w, known.category, known.category_source, idx))
            else:
                guess = category_of(w, pipe, cats)
                out.append(ConceptMaps(w, guess.category, "inferred" if guess.inferred else "lexicon", idx))
        return out
    for c in found:
        if c.role in VISIBLE_ROLES and c.category != "unknown" and c.token_indices:
            if cats is not None and c.category not in cats:
                continue
            out.append(ConceptMaps(c.text, c.category, c.category_source, tuple(c.token_indices)))
    return out


def _checked_concepts(prompt, pipe, words, methods, relevance) -> list[ConceptMaps]:
    for m in methods:
        if m not in METHODS:
            raise AuditorError(f"unknown map method {m!r}; expected one of {', '.join(METHODS)} or 'all'")
    concepts = prompt_concepts(prompt, pipe, words, relevance)
    if not concepts:
        raise AuditorError(f"no concept in {prompt!r} that the lexicon knows: name one with --concept WORD")
    return concepts


def _mapped(tr, concepts: list[ConceptMaps], methods, relevance, k) -> list[ConceptMaps]:
    for c in concepts:
        for m in methods:
            c.maps[m] = concept_map(tr, c.token_indices, m, relevance, c.category, k)
    return concepts


def prompt_maps(pipe, prompt: str, words: Sequence[str] | None = None, methods: Sequence[str] = ("selective",),
                k: int | None = None, seed: int = 0, steps: int = 20, guidance_scale: float = 7.5,
                relevance=None, height: int | None = None, width: int | None = None) -> PromptMaps:
    """Generate one image for ``prompt`` under trace and build every concept's map by every method."""
    concepts = _checked_concepts(prompt, pipe, words, methods, relevance)
    g = torch.Generator("cpu").manual_seed(seed)
    size = {k_: v for k_, v in (("height", height), ("width", width)) if v}
    with trace(pipe, relevance=relevance) as tr:
        image = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, generator=g, **size,
                     **call_kwargs(pipe)).images[0]
    return PromptMaps(prompt, seed, steps, image, _mapped(tr, concepts, methods, relevance, k),
                      relevance.sha256 if relevance is not None else None)


def image_prompt_maps(pipe, image, prompt: str, words: Sequence[str] | None = None,
                      methods: Sequence[str] = ("selective",), k: int | None = None, seed: int = 0,
                      timesteps: Sequence[int] | None = None, draws: int = 1, relevance=None) -> PromptMaps:
    """Every concept's map by every method, read from a given image with ``prompt`` (``trace_image``): nothing
    is generated."""
    concepts = _checked_concepts(prompt, pipe, words, methods, relevance)
    given = load_image(image)
    tr = trace_image(pipe, given, prompt, timesteps=timesteps, seed=seed, draws=draws, relevance=relevance)
    return PromptMaps(prompt, seed, 0, given, _mapped(tr, concepts, methods, relevance, k),
                      relevance.sha256 if relevance is not None else None, tr.reading)


# --- pictures -------------------------------------------------------------------------------------------------


def overlay(image, norm_map: np.ndarray, alpha: float = 0.5, label: str | None = None):
    """The image with a map laid over it (inferno colours), resized to the image; an optional caption strip."""
    from matplotlib import colormaps  # matplotlib loads in about a second: only when a picture is drawn

    base = image.convert("RGB")
    if min(base.size) < 256:  # the bundled model draws 64x64: enlarge so a person can see the map
        f = -(-256 // min(base.size))
        base = base.resize((base.width * f, base.height * f), Image.NEAREST)
    m = Image.fromarray((np.clip(norm_map, 0, 1) * 255).astype(np.uint8)).resize(base.size, Image.BILINEAR)
    heat = (colormaps["inferno"](np.asarray(m) / 255.0)[..., :3] * 255).astype(np.uint8)
    out = Image.blend(base, Image.fromarray(heat), alpha)
    if label:
        strip = Image.new("RGB", (out.width, 14), "white")
        ImageDraw.Draw(strip).text((2, 1), label, fill="black")
        full = Image.new("RGB", (out.width, out.height + 14), "white")
        full.paste(strip, (0, 0))
        full.paste(out, (0, 14))
        out = full
    return out


def side_by_side(panels: Sequence) -> object:
    """Panels (PIL images of one height) left to right with a 2-pixel white gap."""
    w = sum(p.width for p in panels) + 2 * (len(panels) - 1)
    out = Image.new("RGB", (w, max(p.height for p in panels)), "white")
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width + 2
    return out


def save_prompt_maps(result: PromptMaps, out_dir) -> dict:
    """Write ``image.png`` and one overlay PNG per concept (methods side by side); return the JSON record."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        result.image.save(out / "image.png")
    except OSError as exc:
        raise AuditorError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
    record = {"prompt": result.prompt, "seed": result.seed, "steps": result.steps, "image": str(out / "image.png"),
              "relevance_sha256": result.relevance_sha256, "concepts": []}
    if result.reading is not None:  # the maps were read from a given image: say how (the seed seeded the noise)
        record["reading"] = result.reading.to_json()
        del record["steps"]
    for i, c in enumerate(result.concepts):
        slug = re.sub(r"[^a-z0-9]+", "-", c.text.lower()).strip("-") or "concept"
        path = out / f"{i:02d}-{slug}.png"
        panels = [overlay(result.image, m.norm, label=f"{c.text}: {name}" + (f" k={m.k}" if m.k else ""))
                  for name, m in c.maps.items()]
        side_by_side(panels).save(path)
        record["concepts"].append({
            "text": c.text, "category": c.category, "category_source": c.category_source,
            "token_indices": list(c.token_indices), "overlay": str(path),
            "maps": {name: {"heads": len(m.heads), "k": m.k, "peak": round(float(m.raw.max()), 6),
                            "mass": round(float(m.raw.mean()), 6), "mask_area": round(float(m.mask().mean()), 4)}
                     for name, m in c.maps.items()},
        })
    return record
