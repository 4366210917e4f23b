"""The command-line application object, its root options and the helpers its commands share."""

from __future__ import annotations

import json
from typing import Optional

import typer

from auditor import __version__
from auditor.errors import AuditorError


# Plain (click) help, not typer's rich panels: those print every on/off flag as `--json <bool>`, as if it took a
# value.
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help=("Audit text-to-image diffusion models with selective head-relevance attention maps. Models: the bundled "
          "shapes-v1 and shapes-v2, or a diffusers folder of Stable Diffusion 1.x or 2.x (StableDiffusionPipeline) "
          "or SDXL (StableDiffusionXLPipeline)."),
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"auditor {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """auditor: prompt suites -> images -> selective head maps -> flags -> HTML/PDF reports."""


def _print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, ensure_ascii=False))


_MODEL_HELP = ("A bundled model name, a local diffusers folder, or a hub id already in the local cache "
               "(SD 1.x/2.x, SDXL, SD3/SD3.5, Flux, PixArt-α/Σ).")


_VARIANT_HELP = ("Load this variant of the weight files, e.g. fp16 for model.fp16.safetensors (SDXL folders often "
                 "hold only those); default: the plain files.")


_HEIGHT_HELP = "Image height in pixels, a multiple of 8 (default: the suite's resolution, else the model's)."


_WIDTH_HELP = "Image width in pixels, a multiple of 8 (default: the suite's resolution, else the model's)."


def _int_list(text: Optional[str], flag: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise AuditorError(f"{flag} {text!r}: expected a comma list of integers, e.g. 0,1,2") from None
    if not values:
        raise AuditorError(f"{flag} {text!r}: expected a comma list of integers, e.g. 0,1,2")
    return values


def _seed_list(text: Optional[str]) -> Optional[list[int]]:
    seeds = _int_list(text, "--seeds")
    if seeds is None:
        return None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise AuditorError(f"--seeds {text!r}: expected distinct non-negative integers, e.g. 0,1,2")
    from auditor.store import MAX_SEED

    if max(seeds) > MAX_SEED:
        raise AuditorError(f"--seeds {text!r}: a seed may be at most {MAX_SEED}")
    return seeds
