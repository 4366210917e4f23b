"""The bundled reference models (shapes-v1 healthy, shapes-v2 with planted defects, shapes-dit a PixArt transformer on
v1's VAE and text encoder) and the world they learned."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from auditor import registry
from auditor.registry import DEFAULT_MODEL  # noqa: F401 (the zoo's own name for it)

MODELS_DIR = Path(__file__).resolve().parent / "models"
# How the world's models generate: their suites, cards and shipped profiles all use these settings.
STEPS, GUIDANCE = 20, 5.0


@dataclass(frozen=True)
class BundledModel:
    name: str
    path: Path
    version: str
    summary: str
    card: dict = field(default_factory=dict, compare=False)

    def to_json(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def bundled_models() -> list[BundledModel]:
    """Every model folder shipped under auditor/zoo/models with its card (card.json, written after training)."""
    out = []
    for d in sorted(MODELS_DIR.glob("shapes-*")):
        if not (d / "model_index.json").is_file():
            continue
        card = {}
        for name in ("card.json", "training.json"):
            if (d / name).is_file():
                card = {**json.loads((d / name).read_text()), **card}
        out.append(
            BundledModel(
                name=d.name,
                path=d,
                version=d.name.split("-", 1)[1],
                summary=card.get("summary", "shapes-world reference model"),
                card=card,
            )
        )
    return out


def bundled_model(name: str) -> BundledModel | None:
    return next((m for m in bundled_models() if m.name == name), None)


def lexicon() -> dict[str, list[str]]:
    """The world's words by category (the project lexicon's category names): what a bundled model can be
    calibrated on. Categories the world never draws (animals, vehicles...) have no words the model learned."""
    # Imported here: the world draws with scikit-image, and resolving a model name imports this package.
    from auditor.zoo.world import BACKGROUNDS, COLOURS, FRUIT, POSITIONS, SHAPES, SIZES, TEXTURES

    return {
        "colour": sorted(set(COLOURS) | set(BACKGROUNDS)),
        "shape": list(SHAPES),
        "size": list(SIZES),
        "texture": list(TEXTURES),
        "food": [FRUIT],
        "background": ["background"],
        "spatial": list(POSITIONS),
    }


def calibration_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` prompts of the shapes grammar: what a bundled model is calibrated on."""
    from auditor.zoo.grammar import sample_prompts  # here for the same reason as the world in ``lexicon``

    return sample_prompts(n, seed)


def calibration_prompt_source(n: int, seed: int = 0) -> str:
    return f"auditor.zoo.grammar.sample_prompts(n={n}, seed={seed})"


registry.register(registry.ModelSource(
    name="auditor.zoo", models=lambda: {m.name: m.path for m in bundled_models()}, folder=MODELS_DIR,
    owns=re.compile(r"shapes-(v\d+|dit)"), lexicon=lexicon, prompts=calibration_prompts,
    prompt_source=calibration_prompt_source, guidance=GUIDANCE))
