"""Does a bundled model's fidelity depend on the guidance scale? A sweep on a tuning split, apart from the bar's.

    .venv/bin/python bench/zoo_guidance.py --model auditor/zoo/models/shapes-dit --guidance 2,3,4,5,7,9,12

The quality bar (bench/zoo_quality.py) is measured at the shapes world's guidance on its own held-out prompts and
seeds; this sweep draws other held-out prompts (sample seeds 999 and 1000) and image seeds (from 50000), so a scale
chosen from it would not have been chosen on the bar's images. Per guidance scale, bench/zoo_quality.py's fidelity
measures: single-object prompts drawn in the named colour at the named position (and its two halves), and
two-object prompts with both colours present. Writes bench/results/zoo_guidance_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import zoo_quality as zq  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TUNING_SEED, FIRST_IMAGE_SEED = 999, 50000  # the bar's are 123 and 0 (bench/zoo_quality.py)


def sweep(pipe, n: int, scales: list[float]) -> list[dict]:
    """The bar's measures (``zoo_quality.fidelity``) at each guidance scale, on the same n tuning prompts and seeds."""
    out = []
    for g in scales:
        t = time.perf_counter()
        fid = zq.fidelity(pipe, n, TUNING_SEED, guidance=g, first_image_seed=FIRST_IMAGE_SEED)
        fid.pop("samples")
        row = {"guidance": g, **fid, "seconds": round(time.perf_counter() - t, 1)}
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="an exported model folder")
    ap.add_argument("--guidance", required=True, help="comma-separated guidance scales")
    ap.add_argument("--n", type=int, default=200, help="tuning prompts (half single, half pairs)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(args.model)
    res = {"model": path.name, "steps": zq.STEPS, "world_guidance": zq.GUIDANCE, "n": args.n,
           "machine": common.machine(), "date": time.strftime("%Y-%m-%d"),
           "command": "python bench/zoo_guidance.py " + " ".join(sys.argv[1:]),
           "rows": sweep(zq.load(path), args.n, [float(g) for g in args.guidance.split(",")])}
    out = ROOT / "bench" / "results" / f"zoo_guidance_{path.name}.json"
    out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
