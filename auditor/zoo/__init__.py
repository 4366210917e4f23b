"""The bundled reference models (shapes-v1 healthy, shapes-v2 with planted defects) and the world they learned."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "models"
DEFAULT_MODEL = "shapes-v1"


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
