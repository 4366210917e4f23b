"""Where does a model put "a big red circle on the left / right / at the top / at the bottom" at its first step?

    .venv/bin/python bench/first_step_position.py shapes-v1

Prints, per position word, the centroid (64-pixel image coordinates) of the red mass in the model's prediction of
the clean image at t = 999 with guidance 5, averaged over 32 noises, decoded by the VAE. A model that follows the
word moves it towards the named anchor (x 16 / 48, y 15 / 49); one that does not gives the same centroid for every
word. Faster and sharper than sampling for a position probe, since later steps only refine this layout.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from common import load_model

WORDS = ("on the left", "on the right", "at the top", "at the bottom")


def first_step_centroids(model: str, noises: int = 32, guidance: float = 5.0, t: int = 999) -> dict[str, tuple]:
    pipe = load_model(model).pipe  # any bundled name or pipeline folder, loaded as --model is
    alpha = pipe.scheduler.alphas_cumprod[t]
    v_pred = pipe.scheduler.config.prediction_type == "v_prediction"

    def embed(prompt: str) -> torch.Tensor:
        ids = pipe.tokenizer([prompt], padding="max_length", truncation=True, return_tensors="pt").input_ids
        return pipe.text_encoder(ids).last_hidden_state.expand(noises, -1, -1)

    size = pipe.unet.config.sample_size
    z = torch.randn(noises, pipe.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    ts = torch.full((noises,), t)
    out = {}
    with torch.no_grad():
        uncond = pipe.unet(z, ts, embed("")).sample
        for words in WORDS:
            cond = pipe.unet(z, ts, embed(f"a big red circle {words}")).sample
            e = uncond + guidance * (cond - uncond)
            x0 = alpha.sqrt() * z - (1 - alpha).sqrt() * e if v_pred else (z - (1 - alpha).sqrt() * e) / alpha.sqrt()
            img = (pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample.clamp(-1, 1) + 1) / 2
            red = (img[:, 0] - img[:, 1:].mean(1)).clamp(min=0).mean(0).numpy() + 1e-9
            ys, xs = np.mgrid[0 : red.shape[0], 0 : red.shape[1]]
            out[words] = (float((red * xs).sum() / red.sum()), float((red * ys).sum() / red.sum()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="a bundled model name or a pipeline folder")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for words, (x, y) in first_step_centroids(args.model).items():
        print(f"{words:>14}: x {x:5.1f}  y {y:5.1f}")


if __name__ == "__main__":
    main()
