"""Head-relevance calibration budget: how fast do the top-k head sets settle?

    .venv/bin/python bench/calibration.py                 # default: an independent run of 128 prompts
    .venv/bin/python bench/calibration.py --budget 256    # as many prompts as the shipped matrix
    .venv/bin/python bench/calibration.py --relevance PATH.npz

Runs the engine's own calibration batches (``auditor.engine.hrv.vote_batch``: one word per lexicon category drawn per step from the batch's own seed,
every head votes for the category it attends to most) on shapes-grammar prompts from a seed the shipped matrix did
not use (``PROMPT_SEED``; the shipped one used seed 0), 20 steps, guidance 5, and snapshots the votes at growing
budgets. At each budget n, per category, the Jaccard similarity of the top-k head sets:
- against the SHIPPED matrix (an independent calibration at its full budget): the agreement a user gets;
- against this run's own final budget;
- against this run at n/2 (what the engine's stopping rule looks at).
"Reaches 0.9": the smallest budget from which the minimum over categories stays >= 0.9 against the shipped
matrix (and, separately, the mean over categories). Budget fraction = prompts x steps / (2,100 x 50), the
original HRV calibration. Also copies the shipped matrix's own recorded agreement curve.
Results: ``bench/results/calibration.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from auditor.engine.hrv import vote_batch  # noqa: E402
from auditor.engine.relevance import ORIGINAL_BUDGET, jaccard_topk, normalise_rows  # noqa: E402
from auditor.zoo import lexicon  # noqa: E402
from auditor.zoo.grammar import sample_prompts  # noqa: E402

PROMPT_SEED = 1
MARKS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def fraction(prompts: int, steps: int) -> float:
    return prompts * steps / (ORIGINAL_BUDGET["prompts"] * ORIGINAL_BUDGET["steps"])


def reaches(curve: list[dict], key: str, level: float = 0.9) -> int | None:
    """Smallest budget from which ``key`` stays >= level for every later budget; None if never."""
    ok = None
    for row in reversed(curve):
        if row[key] >= level:
            ok = row["prompts"]
        else:
            break
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=int, default=128, help="prompts in this run")
    ap.add_argument("--relevance", default=None, help="the reference matrix (default: the shipped one)")
    ap.add_argument("--k", type=int, action="append", default=None, help="top-k sizes (default: 4, 8, 16)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(common.RESULTS / "calibration.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    mach = common.machine()
    rel_path = Path(args.relevance) if args.relevance else common.default_relevance_path()
    ref = common.load_relevance(rel_path)
    ks = sorted(set(args.k or [4, 8, 16]) | {ref.k})
    lm = common.load_model()
    pipe = lm.pipe
    prompts = sample_prompts(args.budget, PROMPT_SEED)
    words = lexicon()
    categories = tuple(c for c, ws in words.items() if ws)
    if categories != tuple(ref.categories):
        sys.exit(f"categories differ from the reference matrix: {categories} vs {ref.categories}")
    marks = [m for m in MARKS if m < args.budget] + [args.budget]
    snaps: dict[int, np.ndarray] = {}
    done, votes = 0, None
    size = {"height": common.SIDE, "width": common.SIDE}
    for mark in marks:
        while done < mark:  # the engine's own batches (hrv.vote_batch), as `auditor calibrate` runs them
            batch = prompts[done:min(done + args.batch, mark)]
            _, batch_votes = vote_batch(pipe, batch, words, done, common.STEPS, common.GUIDANCE, PROMPT_SEED, size)
            votes = batch_votes if votes is None else votes + batch_votes
            done += len(batch)
        snaps[mark] = votes.copy()
        print(f"[calibration {time.perf_counter() - t0:5.0f}s] {mark}/{args.budget} prompts", flush=True)
    seconds = time.perf_counter() - t0
    final = normalise_rows(snaps[marks[-1]])
    shipped = ref.matrix
    voted = [i for i, v in enumerate(ref.votes.sum(1)) if v > 0]
    curves = {}
    for k in ks:
        rows = []
        for m in marks:
            cur = normalise_rows(snaps[m])
            vs_ref = jaccard_topk(cur, shipped, k)[voted]
            vs_final = jaccard_topk(cur, final, k)[voted]
            half = [h for h in marks if h <= m / 2]
            vs_half = jaccard_topk(normalise_rows(snaps[max(half)]), cur, k)[voted] if half else None
            rows.append({"prompts": m, "budget_fraction": fraction(m, common.STEPS),
                         "min_vs_shipped": float(vs_ref.min()), "mean_vs_shipped": float(vs_ref.mean()),
                         "per_category_vs_shipped": {ref.categories[i]: float(j) for i, j in zip(voted, vs_ref)},
                         "min_vs_final": float(vs_final.min()), "mean_vs_final": float(vs_final.mean()),
                         "min_vs_half": None if vs_half is None else float(vs_half.min()),
                         "mean_vs_half": None if vs_half is None else float(vs_half.mean())})
        reach_min, reach_mean = reaches(rows, "min_vs_shipped"), reaches(rows, "mean_vs_shipped")
        curves[str(k)] = {"curve": rows,
                          "reaches_0.9_min": {"prompts": reach_min,
                                              "budget_fraction": None if reach_min is None else fraction(reach_min, common.STEPS)},
                          "reaches_0.9_mean": {"prompts": reach_mean,
                                               "budget_fraction": None if reach_mean is None else fraction(reach_mean, common.STEPS)}}
    res = {"benchmark": "calibration", "command": common.command(), "machine": mach, "commit": common.git_commit(),
           "model": {"name": "shapes-v1", "fingerprint": lm.fingerprint},
           "reference": {**common.relevance_record(ref, rel_path), "prompt_source": ref.prompt_source,
                         "budget_fraction": ref.budget_fraction, "agreement_curve": ref.agreement_curve},
           "settings": {"prompt_seed": PROMPT_SEED, "budget": args.budget, "steps": common.STEPS,
                        "guidance": common.GUIDANCE, "size": common.SIDE, "ks": ks,
                        "original_budget": ORIGINAL_BUDGET},
           "categories": [ref.categories[i] for i in voted], "curves": curves,
           "seconds": seconds, "seconds_per_prompt": seconds / args.budget,
           "wall_seconds": time.perf_counter() - t0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    for k, c in curves.items():
        last = c["curve"][-1]
        print(f"k={k}: at {last['prompts']} prompts min/mean Jaccard vs shipped {last['min_vs_shipped']:.2f}/"
              f"{last['mean_vs_shipped']:.2f}; min reaches 0.9 at {c['reaches_0.9_min']['prompts']} prompts")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
