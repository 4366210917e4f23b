"""Read a model's attention from an image that already exists: no generation, the same ``Trace`` to read.

The image is encoded by the model's own VAE, noised to a few timesteps of the model's training schedule with
fixed seeds, and the denoiser is run once per noised copy with the prompt (conditional branch only) while the
recorder sums each cross-attention head's probabilities, exactly as during a generation. The maps are then those
of a model asked "where is each word of this prompt in this picture?" at those noise levels.

Noising uses the training schedule's closed form, whatever sampler the pipeline ships with: x_t = sqrt(a_t) x_0 +
sqrt(1 - a_t) e for the diffusion models (SD1.x/2.x, SDXL, PixArt); x_s = (1 - s) x_0 + s e at s = t / T for the
flow-matching ones (SD3, Flux), whose transformers take s (scaled as their pipelines scale it) as the timestep.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from auditor.engine.families import family, grid_unit, native_size, text_kwargs as family_text_kwargs
from auditor.engine.heads import denoiser_of
from auditor.errors import AuditorError

# Where on the training schedule the image is read, as fractions of its length: spread over the middle of the
# schedule, where a noised image still holds its layout (near 1 the copy is almost pure noise, near 0 the prompt
# hardly matters). bench/image_maps.py measures this choice against generation-time maps and other choices.
DEFAULT_FRACTIONS = (0.3, 0.5, 0.7)


@dataclass(frozen=True)
class ImageReading:
    """How a ``Trace`` was filled from a given image (recorded in a run's manifest).

    Attributes:
        timesteps: the training-schedule timesteps the image was noised to, in the order read.
        seed: seeds the noise: draw ``d`` at timestep ``i`` is the ``i * draws + d``-th normal sample of a CPU
            ``torch.Generator`` seeded with it.
        draws: noised copies per timestep.
        read_size: (height, width) in pixels the image was resized to for the model.
        given_size: (height, width) of the image as given; maps come back at this size.
    """

    timesteps: tuple[int, ...]
    seed: int
    draws: int
    read_size: tuple[int, int]
    given_size: tuple[int, int]

    def to_json(self) -> dict:
        return {"mode": "given-image", "timesteps": list(self.timesteps), "noise_seed": self.seed,
                "draws": self.draws, "read_size": list(self.read_size), "given_size": list(self.given_size)}


def default_timesteps(pipe) -> tuple[int, ...]:
    """``DEFAULT_FRACTIONS`` of the pipeline's training schedule, as integer timesteps."""
    n = int(pipe.scheduler.config.num_train_timesteps)
    return tuple(int(round(f * (n - 1))) for f in DEFAULT_FRACTIONS)


def read_size(pipe, given: tuple[int, int]) -> tuple[int, int]:
    """(height, width) to read an image of ``given`` (height, width) at: the model's default pixel count with the
    image's aspect ratio, sides rounded to the model's grid unit. Images are only ever made smaller: one smaller
    than that size on either side is refused (upsampled pixels would be read as if the model had drawn them)."""
    unit, side = grid_unit(pipe), native_size(pipe)
    h0, w0 = given
    scale = side / (h0 * w0) ** 0.5
    h, w = (max(unit, int(round(v * scale / unit)) * unit) for v in (h0, w0))
    if h0 < h or w0 < w:
        raise AuditorError(f"the image is {w0}x{h0} pixels, smaller than the {w}x{h} this model reads an image of "
                           f"that shape at (it makes {side}x{side} images); give a larger image")
    return h, w


def load_image(image):
    """A PIL RGB image from a PIL image, a path or an HxWx3 uint8 array; one-line errors for unreadable input."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        img = image
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
            raise AuditorError(f"an image array must be HxWx3 uint8, got shape {image.shape} {image.dtype}")
        img = Image.fromarray(image)
    else:
        path = Path(image)
        try:
            with Image.open(path) as opened:
                opened.load()
                img = opened.copy()
        except FileNotFoundError:
            raise AuditorError(f"{path}: no such image file") from None
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise AuditorError(f"{path}: not a readable image ({exc.__class__.__name__})") from None
    if img.width < 1 or img.height < 1:
        raise AuditorError("the image is empty (0 pixels)")
    return img.convert("RGB")


def image_shape(image) -> tuple[int, int]:
    """(height, width) of an image (anything ``load_image`` reads)."""
    img = load_image(image)
    return img.height, img.width


@torch.no_grad()
def encode_image(pipe, image, size: tuple[int, int]) -> torch.Tensor:
    """The image's latent [1, C, h, w] in the denoiser's space (the VAE posterior's mean, scaled as the model
    was trained). The mean, not a sample: the latent is a property of the image, not of a seed."""
    vae = pipe.vae
    x = pipe.image_processor.preprocess(image, height=size[0], width=size[1])
    upcast = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    dtype = torch.float32 if upcast else vae.dtype
    if upcast:  # as diffusers' own img2img does: fp16 VAEs that need it encode in float32
        vae.to(torch.float32)
    try:
        latent = vae.encode(x.to(vae.device, dtype)).latent_dist.mean
    finally:
        if upcast:
            vae.to(torch.float16)
    cfg = vae.config
    shift = getattr(cfg, "shift_factor", None) or 0.0
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        m = torch.tensor(mean, device=latent.device, dtype=latent.dtype).view(1, -1, 1, 1)
        s = torch.tensor(std, device=latent.device, dtype=latent.dtype).view(1, -1, 1, 1)
        return (latent - m) * cfg.scaling_factor / s
    return (latent - shift) * cfg.scaling_factor


def flow_matching(pipe) -> bool:
    """Whether the model was trained by flow matching (SD3, Flux) rather than as a diffusion model."""
    return "FlowMatch" in type(pipe.scheduler).__name__


def noise_schedule(pipe) -> torch.Tensor:
    """The cumulative alpha products of the model's training schedule (its scheduler config, any sampler)."""
    from diffusers import DDPMScheduler

    config = {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}
    return DDPMScheduler.from_config(config).alphas_cumprod


def noised(pipe, latent: torch.Tensor, noise: torch.Tensor, t: int, alphas: torch.Tensor | None) -> torch.Tensor:
    """The latent noised to training timestep ``t`` by the model's own noising rule."""
    if alphas is None:  # flow matching: a straight line from the image to the noise
        s = t / float(pipe.scheduler.config.num_train_timesteps)
        return (1.0 - s) * latent.float() + s * noise
    a = float(alphas[t])
    return (a ** 0.5) * latent.float() + ((1.0 - a) ** 0.5) * noise


def check_timesteps(pipe, timesteps: Iterable[int]) -> tuple[int, ...]:
    n = int(pipe.scheduler.config.num_train_timesteps)
    ts = tuple(int(t) for t in timesteps)
    if not ts:
        raise AuditorError("at least one timestep is needed to read an image")
    bad = [t for t in ts if not 0 <= t < n]
    if bad:
        raise AuditorError(f"timesteps must lie in 0..{n - 1} (the model's training schedule), got {bad}")
    return ts


def conditioning(pipe, prompt: str, prompt_2: str | None, size: tuple[int, int], text_kwargs: dict | None = None):
    """(text states, extra denoiser keywords) for the conditional branch, through ``pipe.encode_prompt`` (so a
    tap sees the prompt, as in a generation); ``text_kwargs`` go to ``encode_prompt`` (``max_sequence_length``)."""
    kind = family(pipe)
    if kind != "unet":
        return _transformer_conditioning(pipe, kind, prompt, prompt_2, size,
                                         {**family_text_kwargs(pipe), **(text_kwargs or {})})
    device = pipe.unet.device
    if type(pipe).__name__ == "StableDiffusionXLPipeline":
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=prompt_2, device=device,
                                                   num_images_per_prompt=1, do_classifier_free_guidance=False)
        enc2 = getattr(pipe, "text_encoder_2", None)
        proj = int(pooled.shape[-1]) if enc2 is None else int(enc2.config.projection_dim)
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=embeds.dtype, text_encoder_projection_dim=proj)
        return embeds, {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.to(device)}}
    if prompt_2 is not None:
        raise AuditorError(f"prompt_2 is for pipelines with two text encoders, not {type(pipe).__name__}")
    embeds = pipe.encode_prompt(prompt, device, 1, False)[0]
    return embeds, {}


# Flux-dev's distilled guidance strength when a pipeline call gives none (FluxPipeline's default guidance_scale).
FLUX_GUIDANCE = 3.5


def _transformer_conditioning(pipe, kind: str, prompt: str, prompt_2: str | None, size, text_kwargs: dict):
    device = denoiser_of(pipe).device
    if kind == "pixart":
        if prompt_2 is not None:
            raise AuditorError(f"prompt_2 is for pipelines with two text encoders, not {type(pipe).__name__}")
        embeds, mask, _, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, num_images_per_prompt=1,
                                                device=device, **text_kwargs)
        cond = {"resolution": None, "aspect_ratio": None}
        if getattr(pipe.transformer.config, "sample_size", 0) == 128:  # PixArt-alpha 1024's size conditioning
            cond = {"resolution": torch.tensor([list(size)], dtype=embeds.dtype, device=device),
                    "aspect_ratio": torch.tensor([[size[0] / size[1]]], dtype=embeds.dtype, device=device)}
        return embeds, {"encoder_attention_mask": mask, "added_cond_kwargs": cond}
    if kind == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=prompt_2, prompt_3=None, device=device,
                                                  num_images_per_prompt=1, do_classifier_free_guidance=False,
                                                  **text_kwargs)
        return embeds, {"pooled_projections": pooled}
    embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompt, prompt_2=prompt_2, device=device,
                                                  num_images_per_prompt=1, **text_kwargs)
    extra = {"pooled_projections": pooled, "txt_ids": text_ids}
    if getattr(pipe.transformer.config, "guidance_embeds", False):
        extra["guidance"] = torch.full([1], FLUX_GUIDANCE, device=device, dtype=torch.float32)
    return embeds, extra


def _call_denoiser(pipe, kind: str, noisy: torch.Tensor, t: int, states: torch.Tensor, extra: dict) -> None:
    net = denoiser_of(pipe)
    dev = noisy.device
    if kind == "unet":
        net(noisy.to(net.dtype), torch.tensor([t], device=dev, dtype=torch.long),
            encoder_hidden_states=states.to(net.dtype), return_dict=False, **extra)
    elif kind == "pixart":
        net(noisy.to(net.dtype), encoder_hidden_states=states.to(net.dtype),
            timestep=torch.tensor([t], device=dev, dtype=torch.long), return_dict=False, **extra)
    elif kind == "sd3":  # its pipeline passes the scheduler's timesteps, sigma * T
        net(hidden_states=noisy.to(net.dtype), timestep=torch.tensor([float(t)], device=dev),
            encoder_hidden_states=states.to(net.dtype), return_dict=False, **extra)
    else:  # Flux: latents packed into 2x2 tokens with their positions; its pipeline passes sigma
        b, c, h, w = noisy.shape
        packed = pipe._pack_latents(noisy.to(net.dtype), b, c, h, w)
        ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, dev, net.dtype)
        sigma = t / float(pipe.scheduler.config.num_train_timesteps)
        net(hidden_states=packed, timestep=torch.tensor([sigma], device=dev), encoder_hidden_states=states.to(net.dtype),
            img_ids=ids, return_dict=False, **extra)


@torch.no_grad()
def run_passes(pipe, latent: torch.Tensor, states: torch.Tensor, extra: dict, timesteps: Sequence[int], seed: int,
               draws: int) -> None:
    """The denoiser once per (timestep, draw) on the noised latent; what it attends to is the tap's business."""
    kind = family(pipe)
    alphas = None if flow_matching(pipe) else noise_schedule(pipe)
    g = torch.Generator("cpu").manual_seed(int(seed))
    for t in timesteps:
        for _ in range(draws):
            noise = torch.randn(latent.shape, generator=g, dtype=torch.float32).to(latent.device)
            _call_denoiser(pipe, kind, noised(pipe, latent, noise, t, alphas), t, states, extra)
