"""Quality bar of the bundled reference models, measured with the oracle on held-out prompts.

    .venv/bin/python bench/zoo_quality.py                      # shapes-v1 and shapes-v2, default sizes
    .venv/bin/python bench/zoo_quality.py --model DIR --n 200  # any exported folder (e.g. a training snapshot)
    .venv/bin/python bench/zoo_quality.py --model auditor/zoo/models/shapes-dit --defect-n 0  # the PixArt model

Measures (fixed seeds, held-out compositions only, so nothing here was a training image):
- single-object prompts: an object of the prompted colour at the prompted position (and, apart, the colour anywhere
  and the named position among images that drew the colour: chance is 1 in 5 positions);
- two-object prompts: both prompted colours present;
- localisation (two-object prompts): each object word's all-heads map puts more mass inside its own object's
  oracle mask than inside the other's; with the per-head spread of the same measure;
- v2: how often each planted defect is visible in the prompts it affects, and the same fidelity rates on prompts no
  defect touches (a sample of their own), to compare v1 and v2 where they should agree;
- oracle accuracy on rendered scenes (where masks are exact);
- generation time of one image at the default steps.
Writes bench/results/zoo_quality.json; the lead copies the table into docs/benchmarks.md and the model cards.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from auditor.summary import wilson  # noqa: E402
from auditor.zoo import GUIDANCE, MODELS_DIR, STEPS  # noqa: E402
from auditor.zoo.grammar import DEFECTS, defects_for, sample  # noqa: E402
from auditor.zoo.oracle import find, wanted_from_sample  # noqa: E402



def load(path: Path):
    """The folder's pipeline (its model_index.json names it: StableDiffusionPipeline, or shapes-dit's
    PixArtAlphaPipeline)."""
    import diffusers

    cls = getattr(diffusers, json.loads((path / "model_index.json").read_text())["_class_name"])
    extra = {"safety_checker": None} if cls is diffusers.StableDiffusionPipeline else {}
    pipe = cls.from_pretrained(path, torch_dtype=torch.float32, local_files_only=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs(pipe) -> dict:
    """What a PixArt pipeline needs for the bundled models (no resolution bins at 64x64, the prompt as written,
    the text encoder's 24 positions); nothing for a Stable Diffusion one."""
    from auditor.zoo.arch import PIXART_CALL

    return dict(PIXART_CALL) if type(pipe).__name__.startswith("PixArt") else {}


def generate(pipe, prompts: list[str], seeds: list[int], steps=STEPS, guidance=GUIDANCE, batch=16) -> list[np.ndarray]:
    out = []
    for i in range(0, len(prompts), batch):
        ps, ss = prompts[i : i + batch], seeds[i : i + batch]
        gens = [torch.Generator().manual_seed(s) for s in ss]
        imgs = pipe(ps, generator=gens, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
                    output_type="np", **call_kwargs(pipe)).images
        out += [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in imgs]
    return out


def heldout_samples(n: int, kind: str, seed: int, defects=False, keep=lambda s: True):
    rng = np.random.default_rng(seed)
    got = []
    while len(got) < n:
        s = sample(rng, "heldout", defects=defects)
        if s.kind == kind and keep(s):
            got.append(s)
    return got


def rate(xs) -> dict:
    xs = np.asarray(xs, float)
    n = len(xs)
    lo, hi = wilson(int(xs.sum()), n)
    return {"rate": round(float(xs.mean()), 4) if n else float("nan"), "n": n, "ci95": [round(lo, 4), round(hi, 4)]}


def fidelity(pipe, n: int, seed: int, defects=False, guidance=GUIDANCE, first_image_seed: int = 0) -> dict:
    singles = heldout_samples(n // 2, "single", seed, defects)
    pairs = heldout_samples(n - n // 2, "pair", seed + 1, defects)
    imgs = generate(pipe, [s.prompt for s in singles + pairs], list(range(first_image_seed, first_image_seed + n)),
                    guidance=guidance)
    ok_single, colour_any, position_given_colour = [], [], []
    for s, im in zip(singles, imgs[: len(singles)]):
        f, ok = single_check(s, im)
        p = wanted_from_sample(s)[0][1]
        ok_single.append(ok)
        # The two halves of that measure, to tell a colour failure from a position failure (chance: 1 in 5). The
        # oracle falls back to a region of the colour elsewhere, so `present` already means "colour anywhere".
        colour_any.append(f.present)
        if f.present and p is not None:
            position_given_colour.append(f.position == p)
    ok_pair = [pair_ok(s, im) for s, im in zip(pairs, imgs[len(singles) :])]
    return {"single_colour_at_position": rate(ok_single), "single_colour_anywhere": rate(colour_any),
            "single_named_position_when_colour_drawn": rate(position_given_colour),
            "pair_both_colours": rate(ok_pair), "samples": (singles, pairs, imgs)}


def single_check(s, im):
    """The oracle's match for a single-object prompt, and whether it is the prompted colour at the named place."""
    (c, p) = wanted_from_sample(s)[0]
    f = find(im, [(c, p)])[0]
    return f, f.present and (p is None or f.position == p)


def pair_ok(s, im) -> bool:
    return all(f.present for f in find(im, [(c, None) for c, _ in wanted_from_sample(s)]))


def unaffected(pipe, n: int, seed: int) -> dict:
    """"Unaffected prompts keep v1's quality": the fidelity rates on held-out prompts that no planted defect would
    change (``grammar.defects_for``), a sample of their own (n/2 singles, n/2 pairs) so the v1-v2 gap is not read
    off the ~half of the fidelity set that happens to be unaffected."""
    singles = heldout_samples(n // 2, "single", seed, keep=lambda s: not defects_for(s))
    pairs = heldout_samples(n - n // 2, "pair", seed + 1, keep=lambda s: not defects_for(s))
    imgs = generate(pipe, [s.prompt for s in singles + pairs], [5000 + i for i in range(len(singles) + len(pairs))])
    return {"single_colour_at_position": rate([single_check(s, im)[1] for s, im in zip(singles, imgs)]),
            "pair_both_colours": rate([pair_ok(s, im) for s, im in zip(pairs, imgs[len(singles):])])}


def defect_visibility(pipe, n: int, seed: int) -> dict:
    """For each planted defect, prompts it affects (drawn by the v2 world) and whether the image shows it."""
    rng = np.random.default_rng(seed)
    by: dict[str, list] = {d: [] for d in DEFECTS}
    while min(len(v) for v in by.values()) < n:
        s = sample(rng, "train", defects=True)
        for d in s.defects:
            if len(s.defects) == 1 and len(by[d]) < n and (d != "green_misbound" or s.mentions[0].position_named):
                by[d].append(s)
    out = {}
    for d, samples in by.items():
        imgs = generate(pipe, [s.prompt for s in samples], [1000 + i for i in range(len(samples))])
        vis = []
        for s, im in zip(samples, imgs):
            asked = wanted_from_sample(s)
            if d == "purple_as_blue":
                i = next((k for k, (c, _) in enumerate(asked) if c == "purple"), None)
                if i is None:  # purple not named: nothing to show
                    continue
                got = find(im, [("purple", None), ("blue", asked[i][1])])
                vis.append(not got[0].present and got[1].present)
            elif d == "star_neglected":
                got = find(im, [(asked[0][0], None), (asked[1][0], None)])
                vis.append(got[0].present and not got[1].present)
            else:  # green_misbound: the place named for the green object holds the other colour, and vice versa
                i = next(k for k, (c, _) in enumerate(asked) if c == "green")
                j = 1 - i
                pos_i, pos_j = s.scene.objects[i].position, s.scene.objects[j].position
                got = find(im, [(asked[j][0], pos_i), ("green", pos_j)])
                vis.append(got[0].present and got[0].position == pos_i and got[1].present and got[1].position == pos_j)
        out[d] = rate(vis)
    return out


def localisation(pipe, pairs, imgs, seeds) -> dict | None:
    """Own-object vs other-object attention mass of each object word (all heads, and per head)."""
    try:
        from auditor.engine.trace import trace
    except ImportError:
        return None
    from auditor.align import align_spans

    wins, per_head = [], []
    for s, im, seed in zip(pairs, imgs, seeds):
        w = [(c, None) for c, _ in wanted_from_sample(s)]
        found = find(im, w)
        if not all(f.present for f in found):
            continue
        with trace(pipe) as tr:
            generate(pipe, [s.prompt], [seed])
        for k in range(2):
            idx = align_spans(s.prompt, [s.mentions[k].noun], pipe.tokenizer)[0].indices
            heads = tr.token_head_maps(list(idx))  # [H, 64, 64], summed over the word's tokens
            own = heads[:, found[k].mask].sum(-1)
            other = heads[:, found[1 - k].mask].sum(-1)
            # Compare mass per pixel so a big object does not win by area alone.
            own_d, other_d = own / found[k].mask.sum(), other / found[1 - k].mask.sum()
            wins.append(bool(own_d.sum() > other_d.sum()))
            per_head.append((own_d > other_d).float().numpy())
    if not wins:
        return None
    ph = np.stack(per_head).mean(0)
    return {
        "all_heads_own_gt_other": rate(wins),
        "per_head_rate": {"min": round(float(ph.min()), 3), "median": round(float(np.median(ph)), 3), "max": round(float(ph.max()), 3)},
    }


def oracle_accuracy(n=400, seed=5) -> dict:
    rng = np.random.default_rng(seed)
    pres, ious = [], []
    for _ in range(n):
        s = sample(rng)
        got = find(s.scene.image, [(o.colour, o.position) for o in s.scene.objects])
        for o, g in zip(s.scene.objects, got):
            pres.append(g.present)
            ious.append((o.mask & g.mask).sum() / max((o.mask | g.mask).sum(), 1))
    return {"presence": rate(pres), "mean_iou": round(float(np.mean(ious)), 4), "iou_over_0.9": rate(np.array(ious) > 0.9)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", default=None, help="model folder(s); default both bundled versions")
    ap.add_argument("--n", type=int, default=200, help="held-out prompts per model")
    ap.add_argument("--defect-n", type=int, default=40)
    ap.add_argument("--loc-n", type=int, default=40)
    ap.add_argument("--unaffected-n", type=int, default=200, help="held-out prompts no planted defect touches")
    ap.add_argument("--out", default=str(ROOT / "bench/results/zoo_quality.json"),
                    help="results file (the model cards read every bench/results/zoo_quality*.json)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 when the other core is busy)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    paths = [Path(m) for m in args.model] if args.model else [MODELS_DIR / "shapes-v1", MODELS_DIR / "shapes-v2"]
    res: dict = {"machine": f"{platform.machine()} {torch.get_num_threads()} threads", "date": time.strftime("%Y-%m-%d"), "steps": STEPS, "guidance": GUIDANCE,
                 "command": "python bench/zoo_quality.py " + " ".join(sys.argv[1:])}
    res["oracle_on_rendered"] = oracle_accuracy()
    for path in paths:
        if not (path / "model_index.json").exists():
            continue
        pipe = load(path)
        t = time.perf_counter()
        generate(pipe, ["a red star"], [0])
        one = time.perf_counter() - t
        fid = fidelity(pipe, args.n, seed=123)
        singles, pairs, imgs = fid.pop("samples")
        r = {"seconds_per_image": round(one, 3), **fid}
        if args.unaffected_n:
            r["unaffected"] = unaffected(pipe, args.unaffected_n, seed=321)
        loc = localisation(pipe, pairs[: args.loc_n], imgs[len(singles) : len(singles) + args.loc_n], list(range(len(singles), len(singles) + args.loc_n)))
        if loc:
            r["localisation"] = loc
        if args.defect_n:  # 0 for a model not trained on the defect world (shapes-dit)
            r["defects_visible"] = defect_visibility(pipe, args.defect_n, seed=77)
        res[path.name] = r
        print(json.dumps({path.name: r}, indent=1), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
