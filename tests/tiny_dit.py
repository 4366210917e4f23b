"""Randomly initialised, tiny copies of the transformer pipelines (PixArt-α, SD3, SD3.5, Flux), for tests that need
no weights, built the way diffusers' own pipeline tests build their dummy components.

The T5 tokenizer is a SentencePiece unigram model trained here, in seconds, on a few sentences (nothing is
downloaded), wrapped in ``transformers.T5Tokenizer``; CLIP encoders use the shipped CLIP BPE tokenizer.

| copy  | text-reading attention                                              | heads |
|-------|---------------------------------------------------------------------|-------|
| PixArt| 2 blocks' attn2 (cross-attention to T5, padding masked), 3 heads    | 6     |
| SD3   | 2 joint blocks (the last context-pre-only), 4 heads; patch 2        | 8     |
| SD3.5 | as SD3 plus image self-attention attn2 in block 0 (not text), qk RMS | 8    |
| Flux  | 1 double-stream + 2 single-stream blocks, 2 heads, rotary            | 6     |
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch

CORPUS = [
    "a red cat next to a blue car", "a green dog on a yellow bench", "an astronaut riding a horse on the moon",
    "a photo of a cat and a dog", "two red apples on a wooden table", "a small house under a tall tree",
    "a woman wearing a hat", "a man holding a red umbrella in the rain", "a circle and a square",
]
EXPECTED_HEADS = {"pixart": 6, "sd3": 8, "sd35": 8, "flux": 6}
T5_WIDTH = 32


@functools.lru_cache(maxsize=None)
def t5_tokenizer(model_max_length: int = 512):
    """A T5 tokenizer on a SentencePiece model trained on ``CORPUS`` (ids: pad 0, eos 1, unk 2, as T5's)."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    folder = Path(tempfile.mkdtemp(prefix="tiny-spm-"))
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_prefix=str(folder / "spiece"), vocab_size=90, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2, num_threads=1)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _t5(width: int = T5_WIDTH):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=len(t5_tokenizer()), d_model=width, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(cfg).eval()


def _vae():
    from diffusers import AutoencoderKL

    # shift/scaling set explicitly: the SD3 and Flux pipelines read both
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=64, shift_factor=0.0, scaling_factor=1.0,
    ).eval()


def _clip(projection: bool):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from tiny_pipelines import _text_config

    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(_text_config(projection)).eval()


def build_pixart(seed: int = 0):
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=32, num_layers=2, patch_size=2, attention_head_dim=4, num_attention_heads=3,
        caption_channels=T5_WIDTH, in_channels=4, cross_attention_dim=12, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6).eval()
    pipe = PixArtAlphaPipeline(tokenizer=t5_tokenizer(), text_encoder=_t5(), vae=_vae(), transformer=transformer,
                               scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_sd3(seed: int = 0, v35: bool = False):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from auditor.tokenizer import load_tokenizer

    torch.manual_seed(seed)
    extra = dict(dual_attention_layers=(0,), qk_norm="rms_norm") if v35 else {}
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=4,
        caption_projection_dim=16, joint_attention_dim=2 * T5_WIDTH, pooled_projection_dim=2 * T5_WIDTH,
        out_channels=4, pos_embed_max_size=16, **extra).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(),
        text_encoder=_clip(True), tokenizer=load_tokenizer(), text_encoder_2=_clip(True), tokenizer_2=load_tokenizer(),
        text_encoder_3=_t5(2 * T5_WIDTH), tokenizer_3=t5_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_flux(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from auditor.tokenizer import load_tokenizer

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=T5_WIDTH, pooled_projection_dim=32, axes_dims_rope=[2, 2, 4]).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(), text_encoder=_clip(False),
                        tokenizer=load_tokenizer(), text_encoder_2=_t5(), tokenizer_2=t5_tokenizer(),
                        transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


BUILDERS = {"pixart": build_pixart, "sd3": build_sd3, "sd35": functools.partial(build_sd3, v35=True),
            "flux": build_flux}


@functools.lru_cache(maxsize=None)
def shared(family: str):
    """One copy per family per test session: tests must leave it as they found it."""
    return BUILDERS[family]()


def generate(pipe, prompt="a red cat next to a blue car", steps: int = 2, seed: int = 0, height: int = 64,
             width: int = 64, **kw):
    """Images as a numpy array [N, H, W, 3], deterministic for a seed (short T5 sequences keep tests fast)."""
    name = type(pipe).__name__
    kw.setdefault("max_sequence_length", 24)
    if name == "PixArtAlphaPipeline":
        kw.setdefault("use_resolution_binning", False)  # its bins are the real model's sizes, not 64 px
        kw.setdefault("clean_caption", False)  # needs bs4 and ftfy; the captions here are plain
    g = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, height=height, width=width, generator=g, output_type="np",
                **kw).images
