"""Can the bundled UNet learn position words at all, and through which part does it fail? A five-minute probe.

    .venv/bin/python bench/position_capacity.py --conditioning token   # a clean learned token per position
    .venv/bin/python bench/position_capacity.py --conditioning text    # real prompts through a fresh CLIP encoder
    .venv/bin/python bench/position_capacity.py --conditioning text --only-position-token

The task is the part of denoising that only the prompt can solve: from pure noise at the last timestep (zero
terminal SNR, where the noisy latent shows nothing), output a blob where the prompt's position word puts the object
(left / right / top / bottom / centre anchors of the shapes world, in latent pixels). Nothing else is learned, so
a UNet that cannot do this cannot follow "on the left" in the full model either. Reported: the distance between the
output's centroid and the named anchor (about 3 latent pixels = no better than the average of the five anchors).

- ``token``: the context is one learned embedding per position plus fixed filler; the UNet alone must place it.
- ``text``: the context is a fresh ``CLIPTextModel`` (the bundled architecture) over real single-object grammar
  prompts that name a position, trained jointly, as in ``auditor.zoo.train``.
- ``--only-position-token``: as ``text``, but every context state except the position word's is zeroed (tells a
  text encoder that does not separate the words from a UNet that cannot find the word among the others).

Writes ``bench/results/position_capacity.json`` (one entry per conditioning). Not part of ``make bench``: it
trains (CPU minutes), it measures a training recipe rather than a shipped model.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from common import RESULTS, command, machine

ANCHORS = {"left": (4, 8), "right": (12, 8), "top": (8, 4), "bottom": (8, 12), "center": (8, 8)}  # latent (x, y)


def blob(positions: list[str], ys, xs) -> torch.Tensor:
    return torch.stack([torch.exp(-((xs - ANCHORS[p][0]) ** 2 + (ys - ANCHORS[p][1]) ** 2) / 8.0) for p in positions])


def centroid_error(out: torch.Tensor, positions: list[str], ys, xs) -> float:
    err = []
    for o, p in zip(out[:, 0].detach().clamp(min=0), positions):
        w = o / (o.sum() + 1e-6)
        err.append(float(torch.hypot((w * xs).sum() - ANCHORS[p][0], (w * ys).sum() - ANCHORS[p][1])))
    return float(np.mean(err))


def main() -> None:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from auditor.zoo import arch
    from auditor.tokenizer import load_tokenizer
    from auditor.zoo.grammar import sample

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--conditioning", choices=("token", "text"), default="text")
    ap.add_argument("--only-position-token", action="store_true")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    unet = UNet2DConditionModel(**arch.UNET_CONFIG)
    names = list(ANCHORS)
    if args.conditioning == "token":
        table = torch.nn.Embedding(len(names), arch.TEXT_WIDTH)
        params = list(unet.parameters()) + list(table.parameters())
    else:
        text = CLIPTextModel(CLIPTextConfig(**arch.TEXT_CONFIG))
        tok = load_tokenizer(arch.CONTEXT_LENGTH)
        params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr)
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    T = torch.full((args.batch,), 999)

    def positioned():
        while True:
            s = sample(rng, "train")
            if s.kind == "single" and s.mentions[0].position_named:
                return s

    curve, t0 = [], time.time()
    for step in range(args.steps):
        if args.conditioning == "token":
            positions = [names[int(i)] for i in rng.integers(0, len(names), args.batch)]
            idx = torch.tensor([names.index(p) for p in positions])
            filler = torch.ones(args.batch, arch.CONTEXT_LENGTH - 1, arch.TEXT_WIDTH)
            ctx = torch.cat([table(idx)[:, None], filler], 1)
        else:
            samples = [positioned() for _ in range(args.batch)]
            positions = [s.scene.objects[0].position for s in samples]
            enc = tok([s.prompt for s in samples], padding="max_length", truncation=True, return_tensors="pt")
            ctx = text(enc.input_ids).last_hidden_state
            if args.only_position_token:
                keep = torch.zeros(ctx.shape[:2], dtype=torch.bool)
                for i, ids in enumerate(enc.input_ids.tolist()):
                    hits = [j for j, t in enumerate(ids) if tok.decode([t]).strip() == positions[i]]
                    keep[i, hits[-1:]] = True
                ctx = ctx * keep[..., None]
        out = unet(torch.randn(args.batch, 4, 16, 16), T, ctx).sample
        target = blob(positions, ys, xs)[:, None].expand(-1, 4, -1, -1)
        loss = ((out - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == args.steps - 1:
            err = centroid_error(out, positions, ys, xs)
            curve.append({"step": step, "loss": round(loss.item(), 5), "centroid_error_px": round(err, 3)})
            print(f"step {step} loss {loss.item():.4f} centroid error {err:.2f} latent px ({time.time() - t0:.0f} s)",
                  flush=True)
    key = args.conditioning + ("+only-position-token" if args.only_position_token else "")
    path = RESULTS / "position_capacity.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    res[key] = {"command": command(), "machine": machine(), "date": time.strftime("%Y-%m-%d"),
                "steps": args.steps, "lr": args.lr, "batch": args.batch,
                "final_centroid_error_px": curve[-1]["centroid_error_px"], "curve": curve}
    path.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
