"""Architecture of the bundled reference model: Stable Diffusion's components, scaled down for a 2-core CPU.

The text encoder is CLIP's causal transformer with the standard 49,408-token BPE vocabulary (any English prompt
tokenizes as in Stable Diffusion). The UNet has cross-attention at two latent resolutions (16x16 and 8x8):
7 cross-attention layers x 8 heads = 56 heads, enough for head selection to mean something.
"""

from __future__ import annotations

TEXT_WIDTH = 64
# The context is cut to the longest shapes-world prompt (24 tokens with start and end) instead of CLIP's 77. With 77,
# about 60 end/padding tokens -- each of which, in a causal encoder, carries the whole prompt -- soaked up ~80% of the
# cross-attention and gave the UNet a position-free summary to draw from, so words never localised (shapes-v1 before
# 2026-12: localisation 0.43). The tokenizer's model_max_length says the same, so the ordinary pipeline pads to it.
CONTEXT_LENGTH = 24

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
)

TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=TEXT_WIDTH,
    intermediate_size=4 * TEXT_WIDTH,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=CONTEXT_LENGTH,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
    projection_dim=TEXT_WIDTH,
)

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    block_out_channels=(32, 64),  # small widths: a 2-core CPU trains it in about an hour
    layers_per_block=1,
    cross_attention_dim=TEXT_WIDTH,
    attention_head_dim=8,  # diffusers' SD1 convention: this is the number of heads per layer
    norm_num_groups=16,
)

# Training noise schedule (Stable Diffusion's); inference uses DDIM over the same betas.
SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)

# Zero terminal SNR (Lin et al., 2024): with SCHEDULE the last training step still holds ~7% of the image, so the
# model learns to read the layout from the starting noise and sampling starts from a distribution it never saw.
# Rescaled betas reach pure noise at t = 999, which needs v-prediction (noise = z_t there) and sampling that starts
# at t = 999 (trailing spacing).
ZERO_SNR_SCHEDULE = dict(SCHEDULE, rescale_betas_zero_snr=True, prediction_type="v_prediction",
                         timestep_spacing="trailing")


def build():
    """Fresh, randomly initialised components (vae, text_encoder, unet)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(**VAE_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    unet = UNet2DConditionModel(**UNET_CONFIG)
    return vae, text_encoder, unet

# shapes-dit: PixArt-α's transformer (cross-attention to the text in every block, padding tokens masked) on the same
# 4x16x16 latent, patch 2 (8x8 = 64 image tokens), reading shapes-v1's frozen CLIP text states (width TEXT_WIDTH,
# projected to the transformer's width as PixArt projects T5's). 6 blocks x 6 heads = 36 cross-attention heads of
# width 32; about 3.9M parameters, 0.56-0.7 s for a batch of 32 on one CPU thread. Chosen over 8 blocks x 8 heads of
# width 16 (2.3M, 0.46 s): after 400 steps each at lr 2e-3 its validation loss was 0.44 against 0.49.
DIT_CONFIG = dict(
    sample_size=16,
    patch_size=2,
    in_channels=4,
    out_channels=4,  # no learned variance: a DDIM sampler needs only the prediction
    num_layers=6,
    num_attention_heads=6,
    attention_head_dim=32,
    cross_attention_dim=6 * 32,  # PixArt projects the caption to the transformer's width before attn2
    caption_channels=TEXT_WIDTH,
    norm_num_groups=8,
)

# What a PixArt pipeline call needs for these models: no resolution bins at 64x64, no caption cleaning (it needs
# extra packages and would change the prompt the tokens are aligned to), the text encoder's 24 positions.
PIXART_CALL = dict(use_resolution_binning=False, clean_caption=False, max_sequence_length=CONTEXT_LENGTH)


def build_dit():
    """A fresh, randomly initialised shapes-dit transformer."""
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(**DIT_CONFIG)
