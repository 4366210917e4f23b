"""Model families: the one place that knows how each supported pipeline family is called and sized.

A family decides how the denoiser is conditioned (``auditor.engine.image_read``), what keyword arguments every
pipeline call of the audit passes (``call_kwargs``, ``text_kwargs``) and the grid images are made on
(``grid_unit``, ``native_size``):

- ``unet``: SD1.x/2.x and SDXL (``pipe.unet``);
- ``pixart``: PixArt-α/Σ (cross-attention to T5, padding masked);
- ``sd3``: SD3/SD3.5 (joint attention over image and text);
- ``flux``: Flux (double- and single-stream blocks).
"""

from __future__ import annotations

from auditor.align import text_length
from auditor.engine.capture_dit import latent_per_cell
from auditor.engine.heads import denoiser_of
from auditor.errors import AuditorError

# PixArt pipelines snap a requested size to their bins only for these transformer sample sizes (others raise)
_PIXART_BINNED = frozenset({32, 64, 128, 256})


def family(pipe) -> str:
    """"unet" (SD1.x/2.x, SDXL), "pixart", "sd3" or "flux": how the denoiser is conditioned and called."""
    name = type(pipe).__name__
    if getattr(pipe, "unet", None) is not None:
        return "unet"
    for key, prefix in (("pixart", "PixArt"), ("sd3", "StableDiffusion3"), ("flux", "Flux")):
        if name.startswith(prefix):
            return key
    raise AuditorError(f"{name}: the auditor works with SD1.x/2.x, SDXL, PixArt, SD3 and Flux pipelines")


def text_kwargs(pipe) -> dict:
    """Keywords for ``pipe.encode_prompt`` (and the pipeline call) that fix how the text is read: the T5 length
    ``auditor.align.text_length`` gives, and for PixArt the caption read as written (its default caption cleaning
    rewrites the prompt, and the audit's word-to-token alignment is on the prompt as written)."""
    kind = family(pipe)
    if kind == "unet":
        return {}
    out = {"max_sequence_length": text_length(pipe)}
    if kind == "pixart":
        out["clean_caption"] = False
    return out


def call_kwargs(pipe) -> dict:
    """Keywords every pipeline call of the audit adds: ``text_kwargs``, and for PixArt no resolution binning when
    its transformer's sample size has no bins (the pipeline raises then; with bins it keeps its default)."""
    out = text_kwargs(pipe)
    if family(pipe) == "pixart" and int(getattr(pipe.transformer.config, "sample_size", 0)) not in _PIXART_BINNED:
        out["use_resolution_binning"] = False
    return out


def grid_unit(pipe) -> int:
    """Pixels per cell of the denoiser's coarsest grid: image sides must be multiples of it."""
    factor = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    net = denoiser_of(pipe)
    if family(pipe) == "unet":
        return factor * 2 ** (len(net.config.block_out_channels) - 1)
    return factor * latent_per_cell(net)


def native_size(pipe) -> int:
    """The side, in pixels, of the square images the model makes by default."""
    factor = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    sample = getattr(pipe, "default_sample_size", None) or denoiser_of(pipe).config.sample_size
    sample = sample[0] if isinstance(sample, (tuple, list)) else sample
    return int(sample) * factor
