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
