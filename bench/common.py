"""Helpers the ground-truth benchmarks share: the model, the machine line, traced generation split by timestep.

Not a benchmark itself. ``traced_batch`` generates a batch under ``auditor.trace`` and snapshots the running
attention sums at segment boundaries (quarters of the denoising steps by default), so any contiguous timestep
window can be evaluated afterwards from one generation instead of one generation per window.
"""

from __future__ import annotations

import copy
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
CACHE = ROOT / "work_bench"  # captured maps, re-analysable without regenerating (git-ignored)
from auditor.zoo import GUIDANCE, STEPS  # noqa: E402,F401  (the shapes world's generation settings)

SIDE = 64  # the shapes-world image side (prompt_suites/shapes-default.yaml)


class Log:
    """A bench's progress lines, each stamped with the seconds since the bench started (``elapsed``)."""

    def __init__(self, name: str):
        self.name, self.t0 = name, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def __call__(self, msg: str) -> None:
        print(f"[{self.name} {self.elapsed():6.0f}s] {msg}", flush=True)


def machine() -> dict:
    """What the numbers were measured on, including how busy the cores were when the run started."""
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        load1 = float("nan")
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "load_average_1min_at_start": round(load1, 2),
            "date": time.strftime("%Y-%m-%d %H:%M")}


def git_commit() -> str | None:
    """The short commit, with "+changes" when the working tree differs from it (figures made before committing)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{head}+changes" if head and dirty else head


def command() -> str:
    return ".venv/bin/python " + " ".join([str(Path(sys.argv[0]).resolve().relative_to(ROOT))] + sys.argv[1:])


def load_model(name: str = "shapes-v1"):
    """A model on the CPU (auditor.engine.models.LoadedModel: .pipe, .fingerprint): a bundled name (shapes-v1 by
    default, or shapes-dit, a PixArt transformer) or a diffusers folder."""
    from auditor.engine.models import load_model

    return load_model(name, device="cpu")


def model_slug(name: str) -> str:
    """How a model names its result and cache files: a bundled name as it is, a folder by its last part."""
    return Path(name).name


def default_relevance_path(name: str = "shapes-v1") -> Path:
    """The HRV matrix shipped beside a model: a bundled model's folder (or a diffusers folder) ``relevance.npz``."""
    from auditor.zoo import MODELS_DIR

    if (MODELS_DIR / name / "model_index.json").is_file() or not (Path(name) / "model_index.json").is_file():
        return MODELS_DIR / name / "relevance.npz"
    return Path(name) / "relevance.npz"


def load_relevance(path: str | Path):
    from auditor.engine.relevance import RelevanceMatrix

    return RelevanceMatrix.load(path)


def relevance_record(rm, path) -> dict:
    return {"path": str(Path(path).resolve().relative_to(ROOT)) if str(Path(path).resolve()).startswith(str(ROOT))
            else str(path), "sha256": rm.sha256, "budget_prompts": rm.budget_prompts, "steps": rm.steps,
            "k": rm.k, "converged": rm.converged}


def segment_bounds(steps: int, segments: int) -> list[int]:
    """Step counts at which each segment ends, e.g. 20 steps in 4 -> [5, 10, 15, 20]."""
    return [round(steps * (q + 1) / segments) for q in range(segments)]


def traced_batch(pipe, prompts: list[str], seeds: list[int], steps: int = STEPS, guidance: float = GUIDANCE,
                 segments: int = 4, side: int = SIDE):
    """Generate ``prompts`` (one image each, seeds fixed) under trace, with the keywords every pipeline call of the
    audit adds (``auditor.engine.families.call_kwargs``: none for a UNet; for PixArt no resolution binning, the
    caption as written, the text encoder's length).

    Returns (images uint8 [n, side, side, 3], per-segment traces). Segment ``q`` is a shallow copy of the trace
    whose buffers hold only the attention of its own steps, so everything in ``auditor.engine.maps`` works on it
    (a map of a window is the mean over the window's steps)."""
    from auditor.engine.families import call_kwargs
    from auditor.engine.trace import trace

    bounds = segment_bounds(steps, segments)
    snaps: list[dict] = []

    def snapshot(i):
        if i + 1 in bounds:
            snaps.append({n: b.clone() for n, b in tr.buffers.items()})

    def on_step_end(_pipe, i, _t, kwargs):
        snapshot(i)
        return kwargs

    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    with trace(pipe) as tr:
        out = pipe(prompts, generator=gens, num_inference_steps=steps, guidance_scale=guidance, height=side,
                   width=side, output_type="np", **step_callback(pipe, snapshot, on_step_end), **call_kwargs(pipe))
    imgs = (np.clip(out.images, 0, 1) * 255).round().astype(np.uint8)
    views, prev, prev_n = [], None, 0
    for snap, n in zip(snaps, bounds):
        v = copy.copy(tr)
        v.buffers = {k: (b - prev[k]) if prev is not None else b for k, b in snap.items()}
        v.steps_counted = n - prev_n
        views.append(v)
        prev, prev_n = snap, n
    if len(views) != segments:
        raise RuntimeError(f"expected {segments} segment snapshots, got {len(views)} (callback not called?)")
    return imgs, views, tr


def step_callback(pipe, snapshot, on_step_end) -> dict:
    """The keywords that have the pipeline call ``snapshot(i)`` after each denoising step i: ``callback_on_step_end``
    where the pipeline takes it (SD, SDXL, SD3, Flux), else the older ``callback`` every step (PixArt-α, whose call
    accepts and ignores ``callback_on_step_end``)."""
    import inspect

    params = inspect.signature(pipe.__call__).parameters
    if "callback_on_step_end" in params or "callback" not in params:
        return {"callback_on_step_end": on_step_end}
    return {"callback": lambda i, _t, _latents: snapshot(i), "callback_steps": 1}


def layer_maps(trace, token_indices, item: int) -> dict[str, np.ndarray]:
    """Each layer's per-head maps of the tokens at the layer's own grid, {layer: [heads, h, w]} (mean over the
    trace's counted steps): the inputs ``auditor.engine.maps.aggregate`` combines."""
    from auditor.engine.maps import _layer_maps

    names = trace.head_index.layers
    return {names[li]: m.float().cpu().numpy() for li, m in _layer_maps(trace, list(token_indices), item)}
