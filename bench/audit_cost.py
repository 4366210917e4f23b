"""Wall time of the default audit, as a user runs it, next to plain generation of the same images.

    .venv/bin/python bench/audit_cost.py            # `auditor audit shapes-default` (HTML + PDF) into work_bench/
    .venv/bin/python bench/audit_cost.py --no-pdf

Runs the console command in a fresh process (model loading, concept extraction, traced generation, maps,
diagnostics, the run store, HTML and PDF reports: everything a user waits for), then generates the same prompts
and seeds without trace in this process, so the per-image cost of auditing can be read against plain generation.
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    mach = common.machine()
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
    pipe = common.load_v1().pipe
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


if __name__ == "__main__":
    main()
