"""The values an audit is asked for, refused as given before anything is loaded or written, and the settings a
resumed run must keep (its manifest is the reference)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from auditor.engine.families import native_size
from auditor.errors import AuditorError
from auditor.store import MAX_SEED, RunStore, acquire_lock
from auditor.vocabulary import GATE_TYPES as FAIL_ON

if TYPE_CHECKING:
    from auditor.runs import AuditOptions


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def resumed_settings(run_dir: Path) -> tuple[dict, str | None]:
    """The run's manifest, with the folder's lock kept (the returned key) for the rest of the resume. A folder that
    differs from its records is refused: continuing it would hand over altered evidence under new checksums."""
    with RunStore.open(run_dir) as store:
        altered = [p for p in store.verify() if "not recorded" not in p]  # a run from before records resumes
        if altered:
            raise store.integrity_error(altered, "it cannot be continued; audit again into a new folder")
        return dict(store.manifest), acquire_lock(run_dir)


def check_values(opts: AuditOptions) -> None:
    """The options' values, refused as given (0 is a value, not "unset"), before anything is loaded."""
    if opts.fail_on is not None and opts.fail_on not in FAIL_ON:
        raise AuditorError(f"--fail-on {opts.fail_on!r}: expected one of {', '.join(FAIL_ON)}")
    if opts.steps is not None and opts.steps < 1:
        raise AuditorError(f"--steps {opts.steps}: must be at least 1")
    if opts.k is not None and opts.k < 1:
        raise AuditorError(f"--k {opts.k}: must be at least 1 head")
    opts.execution().check()
    if opts.images is None and opts.resume is None and (opts.timesteps is not None or opts.draws != 1):
        raise AuditorError("--timesteps and --draws read given images: add --images")
    if opts.images is not None:
        made = [f for f, v in (("--seeds", opts.seeds), ("--steps", opts.steps), ("--height", opts.height),
                               ("--width", opts.width)) if v is not None]
        if made:
            raise AuditorError(f"{', '.join(made)} set how images are generated; with --images nothing is (each "
                               f"image's seed comes from its name or manifest line)")
        if opts.draws < 1:
            raise AuditorError(f"--draws {opts.draws}: must be at least 1")
    for seed in opts.seeds or []:
        if not 0 <= seed <= MAX_SEED:
            raise AuditorError(f"--seeds: {seed} is out of range (0 to {MAX_SEED})")


def check_generation_values(steps: int, seed: int, guidance: float | None, k: int | None) -> None:
    """`maps` and `calibrate`: the generation options' values as given (None: not given), before the model is
    loaded."""
    if steps < 1:
        raise AuditorError(f"--steps {steps}: must be at least 1")
    if not 0 <= seed <= MAX_SEED:
        raise AuditorError(f"--seed {seed}: out of range (0 to {MAX_SEED})")
    if guidance is not None and not (np.isfinite(guidance) and guidance >= 0):
        raise AuditorError(f"--guidance {guidance}: must be a finite number >= 0")
    if k is not None and k < 1:
        raise AuditorError(f"--k {k}: must be at least 1 head")


def check_steps(steps: int, pipe) -> None:
    """More denoising steps than the scheduler was trained with cannot be scheduled."""
    trained = getattr(getattr(pipe, "scheduler", None), "config", {}).get("num_train_timesteps")
    if trained and steps > int(trained):
        raise AuditorError(f"--steps {steps}: the model's scheduler was trained with {trained} steps; use at most that")


def check_model_values(steps: int, k: int | None, pipe, relevance) -> None:
    """Values only the loaded model can judge: its scheduler's training steps, its number of heads, the matrix."""
    check_steps(steps, pipe)
    heads = len(relevance.head_names)
    if k is not None and k > heads:
        raise AuditorError(f"--k {k}: the model has {heads} cross-attention heads; use at most that")
    matrix = np.asarray(relevance.matrix, dtype=np.float64)
    if not np.isfinite(matrix).all():
        bad = int((~np.isfinite(matrix)).sum())
        raise AuditorError(f"relevance matrix {relevance.sha256[:12]}: {bad} of {matrix.size} values are NaN or "
                           f"infinite; recalibrate (`auditor calibrate`) or pass another --relevance")


def check_image_size(height: int | None, width: int | None) -> None:
    for name, value in (("--height", height), ("--width", width)):
        if value is not None and (value < 8 or value % 8):
            raise AuditorError(f"{name} {value}: must be a positive multiple of 8 (the VAE's downsampling)")


def image_size(height: int | None, width: int | None, default, pipe) -> tuple[int, int] | None:
    """(height, width) to generate: --height/--width over ``default`` (the suite's or resumed run's resolution); one
    given alone keeps the other side of ``default``, or of the model's native square size. None: the model's own."""
    check_image_size(height, width)
    if height is None and width is None:
        return tuple(default) if default else None
    if not default:
        native = native_size(pipe)
        default = (native, native)
    return (int(height or default[0]), int(width or default[1]))


def check_resume(prior: dict, opts: AuditOptions, suite_path: Path) -> None:
    """Refuse to continue a run with another suite or other settings: the results would mix two audits."""
    suite = prior.get("suite") or {}
    if suite.get("sha256") and suite_path.is_file() and sha256_of(suite_path) != suite["sha256"]:
        raise AuditorError(f"--resume {opts.resume}: the run audited suite {suite.get('path')} "
                           f"(sha256 {suite['sha256'][:12]}); {suite_path} differs")
    if opts.seeds and list(opts.seeds) != list(prior.get("seeds") or []):
        raise AuditorError(f"--resume {opts.resume}: the run used seeds {prior.get('seeds')}, not {opts.seeds}")
    if opts.steps and int(opts.steps) != int(prior.get("steps") or 0):
        raise AuditorError(f"--resume {opts.resume}: the run used {prior.get('steps')} steps, not {opts.steps}")
    was = prior.get("resolution")
    for name, value, side in (("--height", opts.height, 0), ("--width", opts.width, 1)):
        if value is not None and (not was or int(was[side]) != value):
            size = f"{was[0]}x{was[1]}" if was else "the model's native size"
            raise AuditorError(f"--resume {opts.resume}: the run's images are {size} (height x width), "
                               f"not {name} {value}")
