"""Misinterpretation on the polysemous word "orange": does the winning category match the word's role?

    .venv/bin/python bench/misinterpretation.py               # default: 24 prompt pairs per design (96 images)
    .venv/bin/python bench/misinterpretation.py --pairs 8     # a quick look
    .venv/bin/python bench/misinterpretation.py --relevance PATH.npz

In the shapes world "orange" is a colour ("an orange star") and an object, the fruit ("an orange"). For each
generation the word's category response (``auditor.engine.maps.category_response``: mean attention to the word
inside each candidate category's top-k heads, candidates "colour" and "food", the ones an audit compares) picks a
winner; it is right when it is the category of the word's role in the prompt. Rates have Wilson 95% intervals.
A threshold-free view: the ROC AUC of log(food / colour response) between fruit and colour prompts (0.5 = the
response does not tell the readings apart), with a bootstrap interval.

The text encoder is causal (CLIP), so the hidden state of "orange" depends only on the words before it. Two designs:
- SAME PREFIX pairs: the words before "orange" are identical ("an orange star" / "an orange", "a big orange heart"
  / "a big orange", "a red cross and an orange star" / "a red cross and an orange"): the word's key and value are
  the same in both prompts (checked: the largest difference of its encoder state is reported), so only the image
  queries and the softmax over the other tokens can differ;
- DIFFERENT PREFIX pairs: the colour reading gets a prefix the grammar never puts before the fruit ("a striped
  orange star", "two orange stars"), the fruit keeps an ordinary one.
Also measured: whether the image shows the fruit (its green leaf above an orange region; the detector is checked
on rendered scenes) — what the model actually drew, which the response can be compared with.

Seeds: prompts from ``PROMPT_SEED``, images 30000 + i; results to ``bench/results/misinterpretation.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from stats import bootstrap_auc, rate  # noqa: E402

from auditor.align import word_indices  # noqa: E402
from auditor.engine.maps import category_response  # noqa: E402
from auditor.zoo.grammar import POSITION_PHRASES  # noqa: E402
from auditor.zoo.oracle import colour_labels  # noqa: E402
from auditor.zoo.world import COLOURS, SHAPES  # noqa: E402

PROMPT_SEED, IMAGE_SEED = 7001, 30_000
CANDIDATES = ("colour", "food")
EXPECTED = {"colour": "colour", "fruit": "food"}
KS = (1, 2, 4, 8, 16, 32)
OTHER_COLOURS = [c for c in COLOURS if c not in ("orange", "green")]  # green is the leaf's colour


def pair_prompts(n: int, seed: int) -> list[dict]:
    """``n`` pairs per design: {"design", "template", "colour": prompt, "fruit": prompt}."""
    rng = np.random.default_rng(seed)
    pick = lambda xs: str(xs[int(rng.integers(len(xs)))])  # noqa: E731
    plural = lambda s: s + ("es" if s.endswith(("s", "x")) else "s")  # noqa: E731
    out = []
    same = [
        ("an orange SHAPE", lambda sh, sz, other, pos: ("an orange " + sh, "an orange")),
        ("a SIZE orange SHAPE", lambda sh, sz, other, pos: (f"a {sz} orange {sh}", f"a {sz} orange")),
        ("an orange SHAPE POSITION", lambda sh, sz, other, pos: (f"an orange {sh} {pos}", f"an orange {pos}")),
        ("a COLOUR SHAPE2 and an orange SHAPE", lambda sh, sz, other, pos: (f"{other} and an orange {sh}",
                                                                            f"{other} and an orange")),
    ]
    different = [
        ("a striped orange SHAPE", lambda sh, sz, other, pos: (f"a striped orange {sh}", "an orange")),
        ("a SIZE striped orange SHAPE", lambda sh, sz, other, pos: (f"a {sz} striped orange {sh}", f"a {sz} orange")),
        ("two orange SHAPEs", lambda sh, sz, other, pos: (f"two orange {plural(sh)}", "an orange")),
        ("a COLOUR SHAPE2 and a striped orange SHAPE", lambda sh, sz, other, pos: (
            f"{other} and a striped orange {sh}", f"{other} and an orange")),
    ]
    for design, templates in (("same_prefix", same), ("different_prefix", different)):
        for i in range(n):
            name, make = templates[i % len(templates)]
            sh = pick(SHAPES)
            sh2 = pick([s for s in SHAPES if s != sh])
            other = f"a {pick(OTHER_COLOURS)} {sh2}"
            c, f = make(sh, pick(["small", "big"]), other, pick(list(POSITION_PHRASES.values())))
            if rng.random() < 0.3:
                bg = pick(["white", "black", "gray"])
                c, f = c + f" on a {bg} background", f + f" on a {bg} background"
            out.append({"design": design, "template": name, "colour": c, "fruit": f})
    return out


def leaf_above_orange(img: np.ndarray) -> bool:
    """The fruit's signature: a few leaf-green pixels just above the largest orange region."""
    lab, names = colour_labels(img)
    orange, green = lab == names.index("orange"), lab == names.index("green")
    if orange.sum() < 10:
        return False
    ys, xs = np.nonzero(orange)
    top, x0, x1 = ys.min(), xs.min(), xs.max()
    band = green[max(top - 5, 0):top + 3, max(x0 - 2, 0):x1 + 3]
    return int(band.sum()) >= 3


def encoder_state_gap(pipe, a: str, b: str) -> float:
    """Largest absolute difference of the text encoder's states of "orange" in prompts a and b."""
    with torch.no_grad():
        ea = pipe.encode_prompt(a, "cpu", 1, False)[0][0]
        eb = pipe.encode_prompt(b, "cpu", 1, False)[0][0]
    ia = word_indices(a, "orange", pipe.tokenizer).indices
    ib = word_indices(b, "orange", pipe.tokenizer).indices
    return float((ea[list(ia)] - eb[list(ib)]).abs().max())


def leaf_detector_check(n: int = 200, seed: int = 11) -> dict:
    """The leaf test on rendered scenes (exact images): fruit vs orange-coloured shapes."""
    from auditor.zoo.world import Scene, SceneObject, render

    rng = np.random.default_rng(seed)
    hits = {"fruit": [], "orange_shape": []}
    for i in range(n):
        fruit = i % 2 == 0
        obj = SceneObject("orange" if fruit else str(rng.choice(SHAPES)), "orange", str(rng.choice(["small", "big"])),
                          "solid", str(rng.choice(["left", "right", "top", "bottom", "center"])))
        s = render(Scene([obj], str(rng.choice(["white", "black", "gray"]))), rng)
        hits["fruit" if fruit else "orange_shape"].append(leaf_above_orange(s.image))
    return {"fruit_detected": rate(hits["fruit"]), "shape_detected": rate(hits["orange_shape"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=24, help="prompt pairs per design")
    ap.add_argument("--relevance", default=None)
    ap.add_argument("--k", type=int, default=None, help="top-k heads per category (default: the profile's response k)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(common.RESULTS / "misinterpretation.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    mach = common.machine()
    rel_path = Path(args.relevance) if args.relevance else common.default_relevance_path()
    rm = common.load_relevance(rel_path)
    lm = common.load_model()
    from auditor.profile import profile_for

    k = args.k or profile_for(lm).response_k
    pipe = lm.pipe
    pairs = pair_prompts(args.pairs, PROMPT_SEED)
    items = [(p, role) for p in pairs for role in ("colour", "fruit")]
    records = []
    gen_s = 0.0
    for b0 in range(0, len(items), args.batch):
        chunk = items[b0:b0 + args.batch]
        prompts = [p[role] for p, role in chunk]
        t = time.perf_counter()
        imgs, _, tr = common.traced_batch(pipe, prompts, [IMAGE_SEED + b0 + j for j in range(len(chunk))], segments=1)
        gen_s += time.perf_counter() - t
        for j, ((p, role), prompt, img) in enumerate(zip(chunk, prompts, imgs)):
            idx = word_indices(prompt, "orange", pipe.tokenizer).indices
            resp = {str(kk): category_response(tr, idx, rm, CANDIDATES, kk, item=j) for kk in sorted(set(KS) | {k})}
            records.append({"pair": (b0 + j) // 2, "design": p["design"], "template": p["template"], "role": role,
                            "prompt": prompt, "seed": IMAGE_SEED + b0 + j, "tokens": list(idx), "response": resp,
                            "leaf": leaf_above_orange(img)})
        print(f"[misinterpretation {time.perf_counter() - t0:5.0f}s] {len(records)}/{len(items)}", flush=True)
    gaps = {d: [encoder_state_gap(pipe, p["colour"], p["fruit"]) for p in pairs if p["design"] == d]
            for d in ("same_prefix", "different_prefix")}

    def summary(recs: list[dict], kk: int) -> dict:
        key = str(kk)
        win = lambda r: max(CANDIDATES, key=lambda c: r["response"][key][c])  # noqa: E731
        out = {role: rate([win(r) == EXPECTED[role] for r in recs if r["role"] == role]) for role in EXPECTED}
        out["both"] = rate([win(r) == EXPECTED[r["role"]] for r in recs])
        lr = lambda r: float(np.log(r["response"][key]["food"] / r["response"][key]["colour"]))  # noqa: E731
        out["auc_food_vs_colour"] = bootstrap_auc([lr(r) for r in recs if r["role"] == "fruit"],
                                                  [lr(r) for r in recs if r["role"] == "colour"])
        out["winner_counts"] = {role: {c: sum(win(r) == c for r in recs if r["role"] == role) for c in CANDIDATES}
                                for role in EXPECTED}
        # against what the image shows (leaf or not) rather than what the prompt says
        out["vs_drawn"] = rate([win(r) == ("food" if r["leaf"] else "colour") for r in recs])
        return out

    res = {"benchmark": "misinterpretation", "command": common.command(), "machine": mach,
           "commit": common.git_commit(), "model": {"name": "shapes-v1", "fingerprint": lm.fingerprint},
           "relevance": common.relevance_record(rm, rel_path), "k": k, "candidates": list(CANDIDATES),
           "settings": {"steps": common.STEPS, "guidance": common.GUIDANCE, "size": common.SIDE,
                        "prompt_seed": PROMPT_SEED, "image_seed": IMAGE_SEED, "pairs_per_design": args.pairs},
           "encoder_state_max_abs_diff": {d: {"max": max(g), "min": min(g)} for d, g in gaps.items()},
           "leaf_detector_on_rendered": leaf_detector_check(),
           "drawn_as_fruit": {d: {role: rate([r["leaf"] for r in records if r["design"] == d and r["role"] == role])
                                  for role in EXPECTED} for d in gaps},
           "designs": {d: summary([r for r in records if r["design"] == d], k) for d in gaps},
           "k_sweep": {d: {str(kk): summary([r for r in records if r["design"] == d], kk)["both"] for kk in KS}
                       for d in gaps},
           "per_template": {t: summary([r for r in records if r["template"] == t], k)["both"]
                            for t in dict.fromkeys(r["template"] for r in records)},
           "records": records, "traced_seconds_per_image": gen_s / max(len(records), 1),
           "wall_seconds": time.perf_counter() - t0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    for d, s in res["designs"].items():
        print(f"{d}: colour role right {s['colour']['rate']:.2f}, fruit role right {s['fruit']['rate']:.2f}, "
              f"AUC {s['auc_food_vs_colour']['auc']:.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
