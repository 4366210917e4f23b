"""What a training run of ``auditor.zoo.train`` is asked to do: its options (``parser``) and the one command that
reproduces a run (``recipe_command``), which the bundled models record and ``auditor.zoo.replay`` replays."""

from __future__ import annotations

import argparse


NOT_RECIPE = ("threads", "export_to", "work")  # how or where a run goes, not what it trains


def recipe_command(ap: argparse.ArgumentParser, args: argparse.Namespace, **effective) -> str:
    """The command that reproduces this run: every option that differs from its default, and ``effective`` values
    (defaults that depend on the version, e.g. steps and lr) always, so the record never drifts from the parser."""
    defaults = vars(ap.parse_args(["--version", args.version]))
    values = {**vars(args), **effective}
    parts = ["python -m auditor.zoo.train", f"--version {args.version}"]
    for action in ap._actions:  # argparse exposes option strings only here
        key = action.dest
        if key in ("help", "version") or key in NOT_RECIPE:
            continue
        value = values.get(key)
        if key not in effective and value == defaults.get(key):
            continue
        flag = action.option_strings[0]
        if isinstance(value, bool):
            parts += [flag] if value else []
        elif value is not None:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


def parser(description: str | None = None) -> argparse.ArgumentParser:
    """The options of ``python -m auditor.zoo.train`` (``description``: its help text)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", choices=["v1", "v2", "dit"], required=True)
    ap.add_argument("--from", dest="init", default=None, help="fine-tune from this bundled model (v2: shapes-v1)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--vae-steps", type=int, default=2000)
    ap.add_argument("--vae-from", default=None,
                    help="v1: reuse the VAE of this bundled model or folder instead of training one (saves ~10 "
                         "min); dit: the frozen VAE (default shapes-v1)")
    ap.add_argument("--text-from", default=None,
                    help="dit: the frozen text encoder and tokenizer of this bundled model or folder (default: the "
                         "VAE's model, shapes-v1)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--focus", type=float, default=0.0, help="v2: share of each batch drawn from defect-affected prompts")
    ap.add_argument("--offset-noise", type=float, default=0.0,
                    help="add this much per-channel constant noise in training (0: off; tried 0.1 in a 600-step "
                         "fine-tune probe on 2026-12-01, which did not teach v1 position words)")
    ap.add_argument("--zero-snr", action="store_true",
                    help="zero-terminal-SNR betas with v-prediction (arch.ZERO_SNR_SCHEDULE); without it a "
                         "fine-tune keeps its parent's schedule")
    ap.add_argument("--high-t", type=float, default=0.0,
                    help="share of each batch drawn from prompts that name a position, at t in [--high-t-from * T, "
                         "T), where the noisy latent no longer shows the layout and only the words say where objects "
                         "go (0: off; see docs/benchmarks.md, position probes)")
    ap.add_argument("--high-t-from", type=float, default=0.7)
    ap.add_argument("--pairs", type=float, default=0.0,
                    help="share of each batch drawn from two-object prompts (after the --high-t share)")
    ap.add_argument("--object-weight", type=float, default=0.0,
                    help="weigh the loss under objects 1 + this (0: uniform), so a left-out object costs more")
    ap.add_argument("--export-to", default=None, help="export to this folder instead (e.g. a snapshot mid-run)")
    ap.add_argument("--work", default=None, help="work folder (default work_zoo/<version>), for parallel runs")
    return ap
