"""Randomly initialised, scaled-down copies of the SD1.5, SD2.1 and SDXL pipelines, for tests that need no weights.

Each copy keeps its real model's block layout and the SAME number of heads in every cross-attention layer (so head
counts, names and layer grids match the real model's) but uses head widths of 4 channels, tiny CLIP text encoders
with the real CLIP BPE tokenizer, and a four-level VAE (the real downsampling factor 8). Images of 64x64 give an
8x8 latent; 64x96 a non-square 8x12 one.

| copy  | blocks / layers per block            | heads per attn2 level | attn2 layers | H    |
|-------|--------------------------------------|-----------------------|--------------|------|
| SD1.5 | 3 cross-attn down, mid, 3 up; 2      | 8 everywhere          | 16           | 128  |
| SD2.1 | same, linear projections             | 5 / 10 / 20 (+20 mid) | 16           | 195  |
| SDXL  | 2 cross-attn down, mid, 2 up; 2      | 10 / 20; 2 and 10 transformer layers | 70 | 1300 |
"""

from __future__ import annotations

import functools

import pytest
import torch

TEXT_WIDTH = 32
EXPECTED_HEADS = {"sd15": 128, "sd21": 195, "sdxl": 1300}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine run several times faster on one thread (no oversubscription)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _text_config(projection: bool = False):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407, projection_dim=TEXT_WIDTH if projection else 512,
    )


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=64,
    )


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def _sd_unet(version: str):
    from diffusers import UNet2DConditionModel

    common = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=TEXT_WIDTH,
    )
    if version == "sd15":
        # SD1.5: 8 heads in every layer (diffusers' attention_head_dim holds the head count for SD1).
        return UNet2DConditionModel(block_out_channels=(32, 32, 64, 64), attention_head_dim=8, norm_num_groups=8,
                                    **common)
    # SD2.1: heads = channels / 64 in the real model (5, 10, 20, 20); here channels / 4.
    return UNet2DConditionModel(block_out_channels=(20, 40, 80, 80), attention_head_dim=(5, 10, 20, 20),
                                use_linear_projection=True, upcast_attention=True, norm_num_groups=4, **common)


def _build_sd(version: str, seed: int):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    from auditor.tokenizer import load_tokenizer

    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config()).eval(), tokenizer=load_tokenizer(),
        unet=_sd_unet(version).eval(), scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _build_sdxl(seed: int):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from auditor.tokenizer import load_tokenizer

    torch.manual_seed(seed)
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(20, 40, 80), attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
        use_linear_projection=True, norm_num_groups=4,
        cross_attention_dim=2 * TEXT_WIDTH,  # the two encoders' hidden states side by side
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=TEXT_WIDTH + 6 * time_dim,  # pooled text + 6 size/crop ids
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config()).eval(),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(projection=True)).eval(),
        tokenizer=load_tokenizer(), tokenizer_2=load_tokenizer(), unet=unet.eval(), scheduler=_scheduler(),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.lru_cache(maxsize=None)
def sd15(seed: int = 0):
    """Shared per test session: tests must leave it as they found it (trace restores processors itself)."""
    return _build_sd("sd15", seed)


@functools.lru_cache(maxsize=None)
def sd21(seed: int = 0):
    return _build_sd("sd21", seed)


@functools.lru_cache(maxsize=None)
def sdxl(seed: int = 0):
    return _build_sdxl(seed)


def generate(pipe, prompt="a red cat", steps: int = 2, seed: int = 0, height: int = 64, width: int = 64, **kw):
    """Images as a numpy array [N, H, W, 3], deterministic for a seed."""
    g = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, height=height, width=width, generator=g, output_type="np",
                **kw).images
