"""Retrain a bundled model from nothing by replaying the lineage in its ``training.json``, stage by stage.

    python -m auditor.zoo.replay shapes-v2 --out work_zoo/replay            # v1's stages, then v2's
    python -m auditor.zoo.replay shapes-v1 --out work_zoo/replay --dry-run  # print the commands only
    python -m auditor.zoo.replay shapes-dit --out work_zoo/replay-dit --threads 1

A bundled model is the last of several runs of ``auditor.zoo.train`` (a base run, then fine-tunes ``--from
shapes-v1``), each recorded with its parent. Replaying runs the recorded commands in order, each fine-tune from the
previous stage's export in ``OUT/stage<i>`` (never from the bundled model), and writes the wall time of each stage
to ``OUT/replay.json``. The base stage trains its VAE too: where the recorded run reused an older VAE
(``--vae-from``), the replay does not, so a replay is the full cost from nothing, and its weights differ from the
bundled ones. shapes-dit is one run on shapes-v1's frozen VAE and text encoder: by design its replay reads them
from the bundled shapes-v1 (``--text-from`` is kept; without ``--vae-from`` a dit run takes shapes-v1's), so it
retrains the transformer only. A killed replay continues where it stopped: finished stages are skipped, the running
one resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from auditor.engine.models import resolve  # bundled name or folder, one rule with --model
from auditor.errors import AuditorError

from auditor.zoo.recipe import NOT_RECIPE, parser

PREFIX = ["python", "-m", "auditor.zoo.train"]


def lineage(card: dict) -> list[dict]:
    """The runs that made a model, base run first."""
    runs = []
    while card is not None:
        runs.append(card)
        card = card.get("parent")
    return runs[::-1]


def stage_args(command: str, out: Path, i: int, threads: int) -> list[str]:
    """The recorded command of stage ``i`` as arguments for ``auditor.zoo.train``, rooted in ``out``."""
    words = shlex.split(command)
    if words[:3] != PREFIX:
        raise ValueError(f"not a training command: {command!r}")
    # Where a run reads or writes (its parent, a reused VAE, threads, folders) is the replay's to choose.
    chosen = {flag for a in parser()._actions if a.dest in NOT_RECIPE + ("init", "vae_from")
              for flag in a.option_strings}
    args, rest = [], iter(words[3:])
    for w in rest:
        if w in chosen:
            next(rest)
            continue
        args.append(w)
    if i > 0:
        args += ["--from", str(out / f"stage{i - 1}")]
    return args + ["--threads", str(threads), "--work", str(out / f"work{i}"), "--export-to", str(out / f"stage{i}")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a bundled model name or a model folder with training.json")
    ap.add_argument("--out", required=True, help="folder for the stages' work files and exports")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dry-run", action="store_true", help="print the stage commands and stop")
    args = ap.parse_args(argv)
    try:
        card_file = resolve(args.model)[0] / "training.json"
    except AuditorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not card_file.exists():
        print(f"error: {card_file} does not exist: no lineage to replay", file=sys.stderr)
        return 2
    out = Path(args.out)
    stages = [stage_args(run["command"], out, i, args.threads) for i, run in enumerate(lineage(json.loads(card_file.read_text())))]
    if args.dry_run:
        for s in stages:
            print(shlex.join(PREFIX + s))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    record_file = out / "replay.json"
    record = json.loads(record_file.read_text()) if record_file.exists() else {"model": args.model, "stages": []}
    for i, s in enumerate(stages):
        if (out / f"stage{i}" / "training.json").exists():
            continue
        resumed = (out / f"work{i}").exists()  # then the minutes below miss the killed part
        t0 = time.time()
        rc = subprocess.run([sys.executable, "-m", "auditor.zoo.train", *s]).returncode
        if rc:
            print(f"error: stage {i} failed (exit {rc}); run the same replay again to resume it", file=sys.stderr)
            return rc
        record["stages"].append({"stage": i, "command": shlex.join(PREFIX + s), "resumed": resumed,
                                 "minutes": round((time.time() - t0) / 60, 1)})
        record["total_minutes"] = round(sum(r["minutes"] for r in record["stages"]), 1)
        record_file.write_text(json.dumps(record, indent=2) + "\n")
    print(f"replayed {len(stages)} stages into {out}: {record.get('total_minutes')} min (see {record_file})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
