"""Audit images that already exist (``auditor audit SUITE --images DIR|manifest.jsonl``): which image is which
(prompt, seed), checked before anything is written, and how each is read (``auditor.engine.trace.trace_image``).

A folder holds images named as the run store names them, ``<prompt id>__s<seed>.png`` (so a run folder's
``images/`` reads back as it is), or ``<prompt id>.png`` (seed 0); a run folder itself is read through its
``images/``. A folder with a ``manifest.jsonl``, or that file itself, lists them instead, one JSON object a line:
``{"image": "a.png", "prompt_id": "p1", "seed": 3}`` or ``{"image": "b.jpg", "prompt": "a red circle"}``. Image
paths are relative to the manifest's folder. A prompt given as text that is not a prompt of the suite is audited
under an id of its own (the image's name), without the suite's tags.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from auditor.errors import AuditorError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MANIFEST_NAME = "manifest.jsonl"
_STORE_STEM = re.compile(r"^(?P<pid>.+)__s(?P<seed>\d+)$")


@dataclass(frozen=True)
class GivenImage:
    """One image to audit: its file, the prompt it is read with, and the (prompt id, seed) it is stored under."""

    path: Path
    prompt_id: str
    prompt: str
    seed: int
    tags: tuple[str, ...]
    sha256: str

    def to_json(self) -> dict:
        return {"path": str(self.path), "prompt_id": self.prompt_id, "seed": self.seed, "sha256": self.sha256}


def _entries_of_folder(folder: Path) -> list[dict]:
    if (folder / MANIFEST_NAME).is_file():
        return _entries_of_manifest(folder / MANIFEST_NAME)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files and (folder / "images").is_dir():  # a run folder
        return _entries_of_folder(folder / "images")
    if not files:
        raise AuditorError(f"--images {folder}: no images in the folder (expected {', '.join(IMAGE_SUFFIXES)} "
                           f"files or a {MANIFEST_NAME})")
    out = []
    for p in files:
        m = _STORE_STEM.match(p.stem)
        out.append({"image": str(p), "prompt_id": m["pid"] if m else p.stem, "seed": int(m["seed"]) if m else 0,
                    "_where": p.name})
    return out


def _entries_of_manifest(path: Path) -> list[dict]:
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditorError(f"--images {path}: cannot read it ({exc.__class__.__name__})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AuditorError(f"{where}: not a JSON object ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not row["image"]:
            raise AuditorError(f"{where}: each line needs \"image\": a path")
        has_prompt = isinstance(row.get("prompt"), str) and row["prompt"].strip()
        has_id = isinstance(row.get("prompt_id"), str) and row["prompt_id"]
        if not has_prompt and not has_id:
            raise AuditorError(f"{where}: the line has no prompt: give \"prompt\" (text) or \"prompt_id\"")
        seed = row.get("seed", 0)
        if type(seed) is not int or seed < 0:
            raise AuditorError(f"{where}: \"seed\" must be a non-negative integer, got {seed!r}")
        unknown = set(row) - {"image", "prompt", "prompt_id", "seed"}
        if unknown:
            raise AuditorError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        image = Path(row["image"]).expanduser()
        out.append({**row, "image": str(image if image.is_absolute() else path.parent / image), "seed": seed,
                    "_where": where})
    if not out:
        raise AuditorError(f"--images {path}: the manifest lists no images")
    return out


def _resolve(entry: dict, suite) -> tuple[str, str, tuple[str, ...]]:
    """(prompt id, prompt text, tags) of an entry against the suite."""
    by_id = {p.id: p for p in suite.prompts}
    if entry.get("prompt_id"):
        p = by_id.get(entry["prompt_id"])
        if p is None:
            raise AuditorError(f"{entry['_where']}: prompt id {entry['prompt_id']!r} is not in the suite "
                               f"{suite.name!r}")
        if entry.get("prompt") and entry["prompt"] != p.text:
            raise AuditorError(f"{entry['_where']}: prompt {entry['prompt']!r} differs from the suite's prompt "
                               f"{p.id!r} ({p.text!r})")
        return p.id, p.text, tuple(p.tags)
    same = [p for p in suite.prompts if p.text == entry["prompt"]]
    if same:
        return same[0].id, same[0].text, tuple(same[0].tags)
    own = Path(entry["image"]).stem
    if own in by_id:
        raise AuditorError(f"{entry['_where']}: the image's name {own!r} is a prompt id of the suite, but its prompt "
                           f"is not that prompt's text; rename the image or give \"prompt_id\"")
    return own, entry["prompt"], ()


def plan_given_images(spec: str, suite, check_image) -> list[GivenImage]:
    """Every image to audit, each checked readable (``check_image(path)`` raises ``AuditorError`` on a bad one).

    Args:
        spec: a folder of images, a folder with a manifest.jsonl, or a manifest.jsonl.
        suite: the ``auditor.suites.Suite`` whose prompts the images are matched to.
        check_image: called with each image's path; raises for an image the model cannot read.

    Returns:
        The images in the order listed (folders: by file name); nothing is written.
    """
    src = Path(spec).expanduser()
    if src.is_dir():
        entries = _entries_of_folder(src)
    elif src.is_file():
        entries = _entries_of_manifest(src)
    else:
        raise AuditorError(f"--images {spec}: no such folder or manifest file")
    out, seen = [], {}
    for e in entries:
        pid, prompt, tags = _resolve(e, suite)
        key = (pid, e["seed"])
        if key in seen:
            raise AuditorError(f"{e['_where']}: prompt {pid!r} seed {e['seed']} is also {seen[key]}; give each "
                               f"image of a prompt its own seed")
        seen[key] = e["_where"]
        path = Path(e["image"])
        check_image(path)
        out.append(GivenImage(path, pid, prompt, int(e["seed"]), tags, hashlib.sha256(path.read_bytes()).hexdigest()))
    return out
