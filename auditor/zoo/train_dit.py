"""Train shapes-dit: a PixArt-α transformer on the shapes world, reading a bundled model's frozen VAE and text encoder.

    python -m auditor.zoo.train --version dit --threads 1 --steps 7000 --lr 2e-3 --pairs 0.4 ...

Only the transformer learns: the VAE, the CLIP text encoder and its tokenizer are shapes-v1's (``--vae-from``,
``--text-from``), frozen and copied into the export, so a word's text state is the one shapes-v1's UNet reads and
the two models' maps are comparable. The data, noising and loss are ``auditor.zoo.train``'s (same batches, options
and checkpointing: a killed run resumes from ``work_zoo/dit/ckpt.pt``). The export is a ``PixArtAlphaPipeline``
folder (fp16 safetensors) in ``auditor/zoo/models/shapes-dit/``; call it with ``arch.PIXART_CALL``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from auditor.zoo import arch
from auditor.zoo.train import (MODELS, Recipe, ddpm, export, fit, log, noised, recipe_of, run_card, step_batch,
                               weighted_loss)

DEFAULT_FROM = "shapes-v1"
NO_EXTRA = {"resolution": None, "aspect_ratio": None}  # PixArt's size conditions: off below sample_size 128


def text_states(text, tok, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The text encoder's states and the padding mask, as ``PixArtAlphaPipeline.encode_prompt`` makes them with
    ``max_sequence_length=CONTEXT_LENGTH`` (the transformer never attends to padding)."""
    t = tok(prompts, padding="max_length", max_length=arch.CONTEXT_LENGTH, truncation=True,
            add_special_tokens=True, return_tensors="pt")
    with torch.no_grad():
        return text(t.input_ids, attention_mask=t.attention_mask)[0], t.attention_mask


def train_transformer(work: Path, seed: int, steps: int, batch_size: int, lr: float, logfile: Path, vae, text, tok,
                      init_from: Path | None = None, recipe: Recipe = Recipe(), schedule: dict | None = None):
    """The transformer (from scratch, or fine-tuned from ``init_from``) on frozen ``vae`` and ``text``."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    if init_from is not None:
        model = PixArtTransformer2DModel.from_pretrained(init_from / "transformer", torch_dtype=torch.float32)
    else:
        model = arch.build_dit()
        torch.nn.init.zeros_(model.proj_out.weight)  # DiT's zero-initialised output: starts predicting 0
        torch.nn.init.zeros_(model.proj_out.bias)
    sched = ddpm(schedule or arch.ZERO_SNR_SCHEDULE)
    vae.eval()
    text.eval()

    def loss_at(step):
        x, prompts, left_out, g, hi = step_batch(seed, step, batch_size, recipe)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        cond, mask = text_states(text, tok, prompts)
        zt, t, target = noised(z, sched, g, hi, recipe)
        pred = model(zt, encoder_hidden_states=cond, encoder_attention_mask=mask, timestep=t,
                     added_cond_kwargs=NO_EXTRA).sample
        return weighted_loss(pred, target, x, left_out, recipe.object_weight)

    fit(work, {"transformer": model}, steps, lr, logfile, loss_at)
    return model


def frozen_parts(vae_from: str, text_from: str):
    """The frozen VAE, text encoder and tokenizer, read from bundled models or folders."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    from auditor.engine.models import resolve  # bundled name or folder, one rule with --model

    vae = AutoencoderKL.from_pretrained(resolve(vae_from)[0] / "vae", torch_dtype=torch.float32)
    src = resolve(text_from)[0]
    text = CLIPTextModel.from_pretrained(src / "text_encoder", torch_dtype=torch.float32)
    tok = CLIPTokenizer.from_pretrained(src / "tokenizer")
    for m in (vae, text):
        m.requires_grad_(False)
    return vae, text, tok


def pixart_pipeline(vae, text, tok, transformer, schedule: dict):
    from diffusers import DDIMScheduler, PixArtAlphaPipeline

    return PixArtAlphaPipeline(tokenizer=tok, text_encoder=text, vae=vae, transformer=transformer,
                               scheduler=DDIMScheduler(**schedule))


def main_dit(ap, args, work: Path, logfile: Path) -> None:
    from auditor.engine.models import resolve  # bundled name or folder, one rule with --model

    t0 = time.time()
    init = resolve(args.init)[0] if args.init else None
    steps, lr = args.steps or 7000, args.lr or 2e-3
    if init is not None:  # a fine-tune keeps its parent's frozen parts
        vae_from = text_from = str(init)
    else:
        vae_from = args.vae_from or DEFAULT_FROM
        text_from = args.text_from or vae_from
    vae, text, tok = frozen_parts(vae_from, text_from)
    schedule = arch.ZERO_SNR_SCHEDULE  # v-prediction at zero terminal SNR, trailing DDIM: as shapes-v1 ends
    model = train_transformer(work, args.seed, steps, args.batch, lr, logfile, vae, text, tok, init,
                              recipe_of(args), schedule)
    extra = {} if init is not None else {"vae_from": vae_from, "text_from": text_from}
    card = run_card(ap, args, init, steps, lr, schedule, t0, **extra)
    card["transformer"] = dict(arch.DIT_CONFIG)
    out = Path(args.export_to) if args.export_to else MODELS / "shapes-dit"
    export(out, pixart_pipeline(vae, text, tok, model, schedule), card)
    log(f"exported {out.name} ({card['wall_minutes_this_invocation']} min)", logfile)
