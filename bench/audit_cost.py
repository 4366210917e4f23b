"""Wall time of the default audit, as a user runs it, next to plain generation of the same images.

    .venv/bin/python bench/audit_cost.py            # `auditor audit shapes-default` (HTML + PDF) into work_bench/
    .venv/bin/python bench/audit_cost.py --no-pdf
    .venv/bin/python bench/audit_cost.py --against ../old-checkout --repeats 4   # this code vs another, interleaved

Runs the console command in a fresh process (model loading, concept extraction, traced generation, maps,
diagnostics, the run store, HTML and PDF reports: everything a user waits for), then generates the same prompts
and seeds without trace in this process, so the per-image cost of auditing can be read against plain generation.
With ``--against DIR`` (another checkout of auditor, e.g. ``git worktree add DIR <commit>``) the same audit runs
from both checkouts in alternation (each first in half the repeats), ``--repeats`` times each, in fresh processes
with the same interpreter and libraries, and the ratio of the medians is reported: a before/after figure measured
side by side.
Results: ``bench/results/audit_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SUITE = "shapes-default"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-pdf", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(common.RESULTS / "audit_cost.json"))
    ap.add_argument("--against", default=None, help="another checkout to time the same audit from, interleaved")
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    mach = common.machine()
    if args.against:
        return side_by_side(args, mach, t0)
    run_dir = common.CACHE / "audit_cost_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [str(common.ROOT / ".venv" / "bin" / "auditor"), "audit", SUITE, "--out", str(run_dir), "--json"]
    if args.no_pdf:
        cmd.append("--no-pdf")
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=common.ROOT, capture_output=True, text=True)
    audit_wall = time.perf_counter() - t
    if proc.returncode not in (0, 1):
        sys.exit(f"audit failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    report = json.loads(proc.stdout)
    generated = int(report.get("generated") or 0)

    from auditor.resources import find_suite
    from auditor.suites import load_suite

    suite = load_suite(find_suite(SUITE))
    pipe = common.load_model().pipe
    res_hw = suite.defaults.resolution or (common.SIDE, common.SIDE)
    plain = []
    size = {"height": res_hw[0], "width": res_hw[1]}
    pipe("warm-up", num_inference_steps=2, output_type="np", **size)
    for p in suite.prompts:
        for s in suite.defaults.seeds:
            t = time.perf_counter()
            pipe(p.text, num_inference_steps=suite.defaults.steps, guidance_scale=suite.defaults.guidance,
                 generator=torch.Generator("cpu").manual_seed(int(s)), output_type="np", **size)
            plain.append(time.perf_counter() - t)
    files = {p.name: p.stat().st_size for p in run_dir.iterdir() if p.is_file()}
    res = {"benchmark": "audit_cost", "command": common.command(), "audit_command": "auditor " + " ".join(cmd[1:]),
           "machine": mach, "commit": common.git_commit(), "suite": SUITE, "prompts": len(suite.prompts),
           "seeds": list(suite.defaults.seeds), "steps": suite.defaults.steps, "pdf": not args.no_pdf,
           "generations": generated, "audit_wall_seconds": audit_wall,
           "audit_reported_seconds": report.get("seconds"),
           "audit_seconds_per_generation": audit_wall / max(generated, 1),
           "plain_generation_seconds_median": float(np.median(plain)),
           "plain_generation_seconds_total": float(np.sum(plain)),
           "run_files_bytes": files, "wall_seconds": time.perf_counter() - t0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"audit of {generated} generations: {audit_wall:.1f} s wall ({res['audit_seconds_per_generation']:.2f} s "
          f"each); plain generation {res['plain_generation_seconds_median']:.2f} s each")
    print(f"wrote {args.out}")


def timed_audit(checkout: Path, run_dir: Path, no_pdf: bool) -> float:
    """Wall seconds of `auditor audit SUITE` run from ``checkout``'s sources in a fresh process."""
    import os

    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-c", "import sys; from auditor.cli import main; sys.exit(main())", "audit", SUITE,
           "--out", str(run_dir), "--json"] + (["--no-pdf"] if no_pdf else [])
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if proc.returncode not in (0, 1):
        sys.exit(f"audit from {checkout} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return wall


def side_by_side(args, mach: dict, t0: float) -> None:
    other = Path(args.against).resolve()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=other, capture_output=True,
                            text=True).stdout.strip()
    walls: dict[str, list[float]] = {"this": [], "other": []}
    pair = (("this", common.ROOT), ("other", other))
    for r in range(args.repeats):
        # Whichever runs first in a repeat measured slower on this machine (page cache, CPU clocks), so the order
        # alternates: an even number of repeats puts each checkout first equally often.
        for name, root in (pair if r % 2 == 0 else pair[::-1]):
            walls[name].append(timed_audit(root, common.CACHE / f"audit_cost_{name}", args.no_pdf))
            print(f"repeat {r + 1}: {name} {walls[name][-1]:.1f} s", flush=True)
    med = {k: float(np.median(v)) for k, v in walls.items()}
    res = {"benchmark": "audit_cost_side_by_side", "command": common.command(), "machine": mach,
           "commit": common.git_commit(), "against": {"path": str(other), "commit": commit}, "suite": SUITE,
           "pdf": not args.no_pdf, "order": "alternating, this first in odd repeats", "walls": walls,
           "median_seconds": med, "ratio_this_over_other": med["this"] / med["other"],
           "wall_seconds": time.perf_counter() - t0}
    out = Path(args.out).with_name("audit_cost_side_by_side.json")
    out.write_text(json.dumps(res, indent=1))
    print(f"median wall: this {med['this']:.1f} s, {commit} {med['other']:.1f} s, ratio {res['ratio_this_over_other']:.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
