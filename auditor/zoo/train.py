"""Train the bundled reference model on the shapes world (CPU, seeded, checkpointed, resumable).

    python -m auditor.zoo.train --version v1                 # VAE, then text encoder + UNet, then export
    python -m auditor.zoo.train --version v2 --from shapes-v1 # fine-tune v1 on the world with v2's planted defects
    python -m auditor.zoo.train --version v1 --from shapes-v1 --zero-snr --export-to DIR  # re-train a v1 (probes)
    python -m auditor.zoo.train --version dit --threads 1     # shapes-dit: a PixArt transformer (train_dit.py)

Stages are skipped when their output exists, and the UNet stage resumes from its last checkpoint, so the same
command continues a killed run. Every batch is drawn from ``default_rng([seed, step])``, so a resumed run sees
exactly the data an uninterrupted one would. Work files go to ``work_zoo/<version>/`` (not committed); the
exported pipeline (fp16 safetensors) goes to ``auditor/zoo/models/shapes-<version>/``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from auditor.zoo import arch
from auditor.tokenizer import load_tokenizer
from auditor.zoo.grammar import DEFECTS, sample
from auditor.zoo.recipe import parser, recipe_command
from auditor.zoo.world import JITTER, POSITIONS, SIZE, SIZES, shape_mask

ROOT = Path(__file__).resolve().parents[2]
MODELS = Path(__file__).resolve().parent / "models"


def log(msg: str, logfile: Path) -> None:
    line = f"{time.strftime('%H:%M:%S')} {msg}"
    print(line, flush=True)
    with open(logfile, "a") as f:
        f.write(line + "\n")


class Batch(NamedTuple):
    images: torch.Tensor  # [B, 3, 64, 64] in [-1, 1]
    prompts: list[str]
    left_out: torch.Tensor  # [B, 1, 64, 64] 1 where the prompt asks for an object that a planted defect left out


def left_out_mask(s) -> np.ndarray:
    """Where the objects of a sample that a defect left undrawn would have been (their shape at the named anchor,
    grown by the render's jitter, since an undrawn object was never placed)."""
    out = np.zeros((SIZE, SIZE), bool)
    if not s.defects:  # only a planted defect leaves an object out (no rendered object is ever fully occluded)
        return out
    for o in s.scene.objects:
        if not o.mask.any():
            ax, ay = POSITIONS[o.position]
            out |= shape_mask(o.shape, ax, ay, SIZES[o.size] + JITTER)
    return out


def batch(seed: int, step: int, n: int, defects: bool = False, focus: float = 0.0, positioned: int = 0,
          pairs: int = 0) -> Batch:
    """``n`` training samples; with ``focus``, that share of the batch is drawn (by rejection) from prompts that a
    planted defect affects, cycling through the defects so the rare ones are learned too; the first ``positioned``
    samples are drawn from prompts that name a position, the next ``pairs`` from two-object prompts."""
    rng = np.random.default_rng([seed, step])

    def draw(keep=lambda s: True):  # rejection sampling from the grammar
        s = sample(rng, "train", defects=defects)
        while not keep(s):
            s = sample(rng, "train", defects=defects)
        return s

    samples = [draw(lambda s: any(m.position_named for m in s.mentions)) for _ in range(positioned)]
    samples += [draw(lambda s: s.kind == "pair") for _ in range(pairs)]
    samples += [draw() for _ in range(n - int(n * focus) - positioned - pairs)]
    for i in range(int(n * focus)):
        want = sorted(DEFECTS)[(step * n + i) % len(DEFECTS)]
        samples.append(draw(lambda s: want in s.defects))
    imgs = np.stack([s.scene.image for s in samples]).astype(np.float32) / 127.5 - 1.0
    left_out = torch.from_numpy(np.stack([left_out_mask(s) for s in samples])[:, None].astype(np.float32))
    return Batch(torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), [s.prompt for s in samples], left_out)


def object_mask(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] 1 where a pixel differs from the image's corner (the background colour in this world)."""
    return (x - x[:, :, :1, :1]).abs().sum(1, keepdim=True).gt(0.05).float()


# --- VAE -------------------------------------------------------------------------------------------------------


def train_vae(work: Path, seed: int, steps: int, logfile: Path):
    from diffusers import AutoencoderKL

    out = work / "vae"
    if (out / "config.json").exists():
        return AutoencoderKL.from_pretrained(out, torch_dtype=torch.float32)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**arch.VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    t0 = time.time()
    for step in range(steps):
        lr = 2e-3 * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        x = batch(seed + 7, step, 16).images
        post = vae.encode(x).latent_dist
        # Decode the mean: the UNet is trained on posterior means, and sampling with the initial unit variance
        # would drown the latents in noise for most of this short run (blurry, wrong colours).
        rec = vae.decode(post.mean).sample
        # Flat colours must come back exactly (the oracle reads colours), so L1 + MSE; objects cover ~10% of the
        # pixels, so they weigh 5x (else the background wins and object colours blur to an average); KL only keeps
        # the latents tame.
        w = 1 + 4 * object_mask(x)
        err = rec - x
        loss = (w * (err.abs() + err * err)).mean() / w.mean() + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", logfile)
    vae.eval()
    with torch.no_grad():
        x = batch(seed + 11, 0, 256).images
        std = vae.encode(x).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    log(f"vae latent std {std:.3f} -> scaling_factor {1 / std:.3f}", logfile)
    vae.save_pretrained(out)
    return vae


# --- text encoder + UNet ---------------------------------------------------------------------------------------


class EMA:
    def __init__(self, modules, decay: float):
        self.decay = decay
        self.shadow = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]

    @torch.no_grad()
    def update(self, modules, step: int):
        d = min(self.decay, (1 + step) / (10 + step))
        for sh, m in zip(self.shadow, modules):
            for k, v in m.state_dict().items():
                if v.dtype.is_floating_point:
                    sh[k].mul_(d).add_(v.detach(), alpha=1 - d)
                else:
                    sh[k].copy_(v)


class Recipe(NamedTuple):
    """What each training step draws and how its loss is weighed (the options of ``auditor.zoo.recipe``)."""

    defects: bool = False
    focus: float = 0.0
    offset_noise: float = 0.0
    high_t: float = 0.0
    high_t_from: float = 0.7
    pairs: float = 0.0
    object_weight: float = 0.0


def recipe_of(args, defects: bool = False) -> Recipe:
    return Recipe(defects, args.focus if defects else 0.0, args.offset_noise, args.high_t, args.high_t_from,
                  args.pairs, args.object_weight)


def step_batch(seed: int, step: int, batch_size: int, recipe: Recipe):
    """The step's images, prompts (10% dropped to "" so classifier-free guidance has an unconditional model),
    left-out regions, the step's generator and how many samples are position prompts to be noised at high t."""
    hi = int(batch_size * recipe.high_t)
    x, prompts, left_out = batch(seed, step, batch_size, recipe.defects, recipe.focus, positioned=hi,
                                 pairs=int(batch_size * recipe.pairs))
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    drop = torch.rand(len(prompts), generator=g) < 0.1
    return x, ["" if d else p for p, d in zip(prompts, drop.tolist())], left_out, g, hi


def noised(z: torch.Tensor, sched, g: torch.Generator, hi: int, recipe: Recipe):
    """(z_t, t, target) for latents ``z``: the first ``hi`` at t >= high_t_from * T, where the noisy latent no
    longer shows the layout and only a position-naming prompt can teach it; v-prediction where the schedule says so
    (needed at zero terminal SNR, where noise = z_t), else the noise."""
    noise = torch.randn(z.shape, generator=g)
    if recipe.offset_noise:  # a per-image, per-channel constant: lets the model move the image's low frequencies
        noise = noise + recipe.offset_noise * torch.randn(z.shape[0], z.shape[1], 1, 1, generator=g)
    T = sched.config.num_train_timesteps
    t = torch.randint(0, T, (z.shape[0],), generator=g)
    if hi:
        t[:hi] = torch.randint(int(recipe.high_t_from * T), T, (hi,), generator=g)
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    zt = a.sqrt() * z + (1 - a).sqrt() * noise
    v = sched.config.prediction_type == "v_prediction"
    return zt, t, (a.sqrt() * noise - (1 - a).sqrt() * z) if v else noise


def weighted_loss(pred, target, x, left_out, object_weight: float) -> torch.Tensor:
    """MSE, with latent pixels under an object (any pixel off the background colour) and where the prompt asks for
    an object a planted defect left out weighed 1 + ``object_weight``. A small object is ~4% of the image: under a
    uniform loss, leaving the second object of a pair out costs little; and where a defect leaves an object out the
    lesson is "draw nothing", which weighing drawn objects only made cheap (v2's star was left out in 0.70 of
    prompts before the weight, 0.58 with it)."""
    if not object_weight:
        return F.mse_loss(pred, target)
    where = torch.maximum(object_mask(x), left_out)
    w = 1 + object_weight * F.adaptive_max_pool2d(where, pred.shape[-2:])
    return (w * (pred - target) ** 2).mean() / w.mean()


def fit(work: Path, named: dict, steps: int, lr: float, logfile: Path, loss_at, every: int = 200) -> None:
    """AdamW over every parameter of ``named`` (warm-up, cosine to 10%), gradient clipping, EMA, a checkpoint
    every ``every`` steps that the same call resumes from; ``loss_at(step)`` is the step's loss. Leaves the EMA
    weights in the modules."""
    modules = list(named.values())
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema = EMA(modules, decay=0.999)
    start, ckpt = 0, work / "ckpt.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        for name, m in named.items():
            m.load_state_dict(state[name])
        opt.load_state_dict(state["opt"])
        ema.shadow, start = state["ema"], int(state["step"])
        log(f"resumed from step {start}", logfile)
    t0, seen = time.time(), 0
    for step in range(start, steps):
        cur = lr * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = cur
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(modules, step)
        seen += 1
        if step % 25 == 0 or step == steps - 1:
            rate = (time.time() - t0) / seen
            log(f"step {step}/{steps} loss {loss.item():.4f} lr {cur:.2e} {rate:.2f}s/step "
                f"eta {rate * (steps - step) / 60:.1f} min", logfile)
        if (step + 1) % every == 0 or step == steps - 1:
            tmp = ckpt.with_suffix(".tmp")
            state = {name: m.state_dict() for name, m in named.items()}
            torch.save({**state, "opt": opt.state_dict(), "ema": ema.shadow, "step": step + 1}, tmp)
            tmp.replace(ckpt)
    for sh, m in zip(ema.shadow, modules):
        m.load_state_dict(sh)


def train_denoiser(work, seed, steps, batch_size, lr, logfile, vae, init_from=None, recipe=Recipe(), schedule=None):
    """The UNet and the text encoder, trained together (from scratch, or fine-tuned from ``init_from``)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    if init_from is not None:
        unet = UNet2DConditionModel.from_pretrained(init_from / "unet", torch_dtype=torch.float32)
        text = CLIPTextModel.from_pretrained(init_from / "text_encoder", torch_dtype=torch.float32)
    else:
        unet = UNet2DConditionModel(**arch.UNET_CONFIG)
        text = CLIPTextModel(CLIPTextConfig(**arch.TEXT_CONFIG))
    tok = load_tokenizer(arch.CONTEXT_LENGTH)
    sched = ddpm(schedule or arch.SCHEDULE)
    vae.eval()

    def loss_at(step):
        x, prompts, left_out, g, hi = step_batch(seed, step, batch_size, recipe)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        ids = tok(prompts, padding="max_length", truncation=True, return_tensors="pt").input_ids  # to CONTEXT_LENGTH
        zt, t, target = noised(z, sched, g, hi, recipe)
        pred = unet(zt, t, text(ids).last_hidden_state).sample
        return weighted_loss(pred, target, x, left_out, recipe.object_weight)

    fit(work, {"unet": unet, "text": text}, steps, lr, logfile, loss_at)
    return unet, text


def ddpm(schedule: dict):
    """The training noise schedule (``DDPMScheduler``) of an inference schedule's settings."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**{k: v for k, v in schedule.items() if k not in ("set_alpha_to_one", "timestep_spacing")})


def sd_pipeline(vae, text, unet, schedule=None):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=load_tokenizer(arch.CONTEXT_LENGTH),
                                   unet=unet, scheduler=DDIMScheduler(**(schedule or arch.SCHEDULE)),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def export(out: Path, pipe, card: dict) -> None:
    """Save ``pipe`` to ``out`` as float16 safetensors with ``card`` as training.json, keeping the folder's card,
    README and relevance files; written beside it and renamed into place."""
    pipe.to(torch.float16)
    tmp = out.with_name(out.name + ".tmp")
    pipe.save_pretrained(tmp, safe_serialization=True)
    for cfg in tmp.glob("*/config.json"):  # a component loaded from disk remembers this machine's path: drop it
        data = json.loads(cfg.read_text())
        # transformers loads a model in the dtype its config names, diffusers in float32: a float16 text encoder
        # feeding a float32 UNet fails in plain from_pretrained(path), so the config names float32 (the file keeps
        # float16 weights, and the fingerprint only hashes weight files)
        named_half = data.get("dtype") == "float16"
        if named_half:
            data["dtype"] = "float32"
        if data.pop("_name_or_path", None) is not None or named_half:
            cfg.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    (tmp / "training.json").write_text(json.dumps(card, indent=2))
    if out.exists():
        import shutil

        keep = [p for p in out.iterdir() if p.name in ("README.md", "card.json", "relevance.npz", "relevance.json")]
        for p in keep:
            p.replace(tmp / p.name)
        shutil.rmtree(out)
    tmp.replace(out)


def base_vae(args, work: Path, logfile: Path):
    """A from-scratch run's VAE: reused (``--vae-from``) or trained (``--vae-steps``)."""
    from auditor.engine.models import resolve  # bundled name or folder, one rule with --model

    if args.vae_from and not (work / "vae" / "config.json").exists():
        from diffusers import AutoencoderKL

        src = resolve(args.vae_from)[0]
        AutoencoderKL.from_pretrained(src / "vae", torch_dtype=torch.float32).save_pretrained(work / "vae")
        log(f"vae reused from {src}", logfile)
    return train_vae(work, args.seed, args.vae_steps, logfile)


def unet_schedule(args, init: Path | None) -> dict:
    if args.zero_snr:
        return arch.ZERO_SNR_SCHEDULE
    if init is not None:  # a fine-tune keeps its parent's noise schedule and prediction type
        parent = json.loads((init / "scheduler" / "scheduler_config.json").read_text())
        return {k: parent[k] for k in arch.ZERO_SNR_SCHEDULE if k in parent}
    return arch.SCHEDULE


def run_card(ap, args, init: Path | None, steps: int, lr: float, schedule: dict, t0: float, **extra) -> dict:
    """training.json: what this run did (its recipe command first of all) and, for a fine-tune, its parent's."""
    card = {
        "version": args.version, "seed": args.seed, "steps": steps, "batch": args.batch, "lr": lr,
        "vae_steps": args.vae_steps if init is None else None,
        "vae_from": args.vae_from if init is None else None, "context_length": arch.CONTEXT_LENGTH, **extra,
        "offset_noise": args.offset_noise, "high_t": args.high_t, "high_t_from": args.high_t_from,
        "pairs": args.pairs, "object_weight": args.object_weight, "schedule": schedule,
        "init": str(init.name) if init else None, "defects": args.version == "v2",
        "wall_minutes_this_invocation": round((time.time() - t0) / 60, 1),
        "command": recipe_command(ap, args, steps=steps, lr=lr, batch=args.batch, seed=args.seed, **extra),
    }
    if init is not None and (init / "training.json").exists():  # the lineage: how the parent was made
        card["parent"] = json.loads((init / "training.json").read_text())
    return card


def main() -> None:
    ap = parser(__doc__)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work) if args.work else ROOT / "work_zoo" / args.version
    work.mkdir(parents=True, exist_ok=True)
    logfile = work / "train.log"
    if args.version == "dit":
        from auditor.zoo.train_dit import main_dit  # here: train_dit imports this module

        return main_dit(ap, args, work, logfile)
    from auditor.engine.models import resolve  # bundled name or folder, one rule with --model

    t0 = time.time()
    defects = args.version == "v2"
    init = None if args.version == "v1" and not args.init else resolve(args.init or "shapes-v1")[0]
    steps = args.steps or (5000 if init is None else 1200)
    lr = args.lr or (1e-3 if init is None else 3e-4)
    if init is None:
        vae = base_vae(args, work, logfile)
    else:  # a fine-tune: v2 from v1, or v1 from an earlier v1 (e.g. to change its noise schedule)
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(init / "vae", torch_dtype=torch.float32)
    vae.requires_grad_(False)
    schedule = unet_schedule(args, init)
    unet, text = train_denoiser(work, args.seed + (1 if defects else 0), steps, args.batch, lr, logfile, vae, init,
                                recipe_of(args, defects), schedule)
    card = run_card(ap, args, init, steps, lr, schedule, t0)
    out = Path(args.export_to) if args.export_to else MODELS / f"shapes-{args.version}"
    export(out, sd_pipeline(vae, text, unet, schedule), card)
    log(f"exported {out.name} ({card['wall_minutes_this_invocation']} min)", logfile)


if __name__ == "__main__":
    main()
