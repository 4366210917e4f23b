"""Maps and flags read from given images (``auditor.trace_image``) against those captured while generating.

    .venv/bin/python bench/image_maps.py                 # all three parts
    .venv/bin/python bench/image_maps.py --parts miou    # one part (miou | flags | v2)

Parts, each on ground truth the other benches already use:
- ``miou``: the mIoU bench's splits (``bench/miou.py``; its cached captures in ``work_bench/``, made if absent).
  Every image is read back by shapes-v1 with its own prompt, no generation: the profile's selective map (its
  ranking at its own k per category) and DAAM's all-heads map from the reading against the same maps captured
  during generation, Otsu masks against the oracle's. Paired differences with cluster-bootstrap 95% intervals
  (generations resampled). The timestep sets are compared on the TUNING split only; TEST reports the default
  (``auditor.engine.image_read.DEFAULT_FRACTIONS``, chosen before this bench ran and not changed by it).
- ``flags``: the HEALTHY-EVAL generations of ``bench/diagnostics.py`` (shapes-v1, cached in ``work_diag/``): per
  (concept, image) the set of flag types from the reading against the set at generation time, same profile
  and thresholds. Agreement = the sets are equal.
- ``v2``: the DEFECT-EVAL images of shapes-v2 read by shapes-v1 with shapes-v1's profile (a reference model
  auditing another model's outputs): precision and recall per planted defect, by the same oracle truth as
  ``bench/diagnostics.py eval``, beside shapes-v2 audited while it generates.
Results: ``bench/results/image_maps.json``; ``bench/report.py`` writes its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import diagnostics as diag  # noqa: E402
import miou  # noqa: E402
from stats import iou, paired_difference  # noqa: E402

from auditor.engine.image_read import DEFAULT_FRACTIONS  # noqa: E402
from auditor.engine.maps import binarize, daam_weights, pooled_map  # noqa: E402
from auditor.engine.trace import trace_image  # noqa: E402

FRACTION_SETS = {  # compared on the tuning split
    "0.1-0.3": (0.1, 0.2, 0.3), "0.3-0.7": (0.3, 0.5, 0.7), "0.5-0.9": (0.5, 0.7, 0.9),
    "0.2-0.8x4": (0.2, 0.4, 0.6, 0.8), "0.5": (0.5,), "0.1-0.9x9": tuple(i / 10 for i in range(1, 10)),
}
DEFAULT_SET = next(k for k, v in FRACTION_SETS.items() if v == DEFAULT_FRACTIONS)


def timesteps_of(pipe, fractions) -> tuple[int, ...]:
    n = int(pipe.scheduler.config.num_train_timesteps)
    return tuple(int(round(f * (n - 1))) for f in fractions)


def split_data(lm, split: str, log) -> dict:
    tune = miou.draw_samples(100, miou.TUNE_SEED)
    samples = tune if split == "tune" else miou.draw_samples(200, miou.TEST_SEED, {s.prompt for s in tune})
    path = common.CACHE / f"miou_{split}.npz"
    key = miou.cache_key(lm, split, len(samples))
    data = miou.load(path, key)
    if data is None:
        log(f"{split}: no cached capture, generating ({len(samples)} images)")
        data = miou.capture(lm, split, samples, 8, log)
        miou.save(data, path, key)
    return data


def read_ious(lm, profile, data: dict, fractions, draws: int = 1) -> np.ndarray:
    """[concepts, 2] IoU of the (selective, all_heads) maps read from each generation's image."""
    rows = data["meta"]["rows"]
    ranking, H = profile.maps_source, len(profile.head_names)
    daam = daam_weights(profile.head_names)
    ts = timesteps_of(lm.pipe, fractions)
    out = np.full((len(rows), 2), np.nan)
    by_gen: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_gen.setdefault(r["gen"], []).append(i)
    for g, idx in by_gen.items():
        first = rows[idx[0]]
        image = data["images"][g]
        tr = trace_image(lm.pipe, image, first["prompt"], timesteps=ts, seed=first["seed"], draws=draws)
        for i in idx:
            r = rows[i]
            w = np.zeros(H, np.float32)
            w[ranking.top_heads(r["category"], profile.k_for(r["category"]))] = 1.0
            for col, weights in enumerate((w, daam)):
                m = pooled_map(tr, r["tokens"], weights).float().cpu().numpy()
                out[i, col] = iou(binarize(m), data["truth"][i])
    return out


def generation_ious(profile, data: dict) -> np.ndarray:
    """[concepts, 2] IoU of the (selective, all_heads) maps captured during generation (the mIoU bench's)."""
    ranking, H = profile.maps_source, len(profile.head_names)
    daam = daam_weights(profile.head_names)

    def weights_for(cat):
        W = np.zeros((2, H), np.float32)
        W[0, ranking.top_heads(cat, profile.k_for(cat))] = 1.0
        W[1] = daam
        return W

    return miou.score(data, weights_for)


def part_miou(lm, profile, log) -> dict:
    out: dict = {"default_fractions": list(DEFAULT_FRACTIONS),
                 "default_timesteps": list(timesteps_of(lm.pipe, DEFAULT_FRACTIONS)), "tuning": {}}
    tune = split_data(lm, "tune", log)
    gens = np.array([r["gen"] for r in tune["meta"]["rows"]])
    gen_ious = generation_ious(profile, tune)
    for name, fr in FRACTION_SETS.items():
        t0 = time.perf_counter()
        read = read_ious(lm, profile, tune, fr)
        out["tuning"][name] = {"fractions": list(fr), "seconds_per_image": (time.perf_counter() - t0) / len(set(gens)),
                               **{m: {"read": float(np.nanmean(read[:, c])),
                                      "read_minus_generation": paired_difference(read[:, c], gen_ious[:, c], gens)}
                                  for c, m in enumerate(("selective", "all_heads"))}}
        log(f"tune {name}: selective read {out['tuning'][name]['selective']['read']:.3f} "
            f"(generation {np.nanmean(gen_ious[:, 0]):.3f}), all_heads read {out['tuning'][name]['all_heads']['read']:.3f}")
    test = split_data(lm, "test", log)
    gens = np.array([r["gen"] for r in test["meta"]["rows"]])
    gen_ious = generation_ious(profile, test)
    read = read_ious(lm, profile, test, DEFAULT_FRACTIONS)
    out["test"] = {"concepts": len(gens), "generations": int(len(set(gens)))}
    for c, m in enumerate(("selective", "all_heads")):
        out["test"][m] = {"generation": float(np.nanmean(gen_ious[:, c])), "read": float(np.nanmean(read[:, c])),
                          "read_minus_generation": paired_difference(read[:, c], gen_ious[:, c], gens)}
    out["test"]["read_selective_minus_read_all_heads"] = paired_difference(read[:, 0], read[:, 1], gens)
    t = out["test"]
    log(f"test: selective generation {t['selective']['generation']:.3f} read {t['selective']['read']:.3f} "
        f"(diff {t['selective']['read_minus_generation']['mean']:+.3f} {t['selective']['read_minus_generation']['ci95']}); "
        f"all_heads generation {t['all_heads']['generation']:.3f} read {t['all_heads']['read']:.3f}")
    return out


def read_records(lm, profile, gens: list[dict]) -> list[dict]:
    """Each cached generation's image read back by ``lm`` with its prompt; the audit's records from the reading."""
    from auditor.concepts import extract_many
    from auditor.image_record import generation_record

    extracted = extract_many([g["prompt"] for g in gens], tokenizer=lm.pipe.tokenizer)
    out = []
    for g, cs in zip(gens, extracted):
        image = Image.fromarray(g["image"])
        tr = trace_image(lm.pipe, image, cs.prompt, seed=g["seed"])
        records, raw_maps, _ = generation_record(tr, cs, profile, image)
        out.append({**g, "concepts": records,
                    "maps": {k: v for k, v in raw_maps.items() if k.endswith(("_selective", "_all_heads"))}})
    return out


def eval_sets():
    exclude = diag.suite_prompts() | {s.prompt for s in diag.grammar_set(diag.TUNE_SEED, 400, diag.suite_prompts())}
    v1_set = diag.grammar_set(diag.V1_EVAL_SEED, 200, exclude)
    return v1_set, diag.defect_set(60, 30, exclude | {s.prompt for s in v1_set})  # as docs/benchmarks.md's eval


def part_flags(lm, profile, log) -> dict:
    th = profile.judging_thresholds()
    v1_set, _ = eval_sets()
    gens = diag.generate(lm, profile, v1_set, "v1eval")
    read = read_records(lm, profile, gens)
    pairs = same = any_same = 0
    by_type: dict[str, dict[str, int]] = {}
    for g, r in zip(gens, read):
        fg, fr = diag.reflag(g, th), diag.reflag(r, th)
        assert len(fg) == len(fr), g["prompt"]
        for a, b in zip(fg, fr):
            pairs += 1
            same += a == b
            any_same += bool(a) == bool(b)
            for t in set(a) | set(b):
                d = by_type.setdefault(t, {"both": 0, "generation_only": 0, "read_only": 0})
                d["both" if t in a and t in b else "generation_only" if t in a else "read_only"] += 1
    out = {"pairs": pairs, "agreement": same / pairs, "agreement_ci95": list(diag.wilson(same, pairs)),
           "flagged_or_not_agreement": any_same / pairs, "by_type": by_type,
           "generation_flag_rate": diag.false_flag_rate(gens, th, healthy_only=False),
           "read_flag_rate": diag.false_flag_rate(read, th, healthy_only=False)}
    log(f"flags: {same}/{pairs} (concept, image) pairs agree ({out['agreement']:.3f}); by type {by_type}")
    return out


def part_v2(lm, profile, log) -> dict:
    _, v2_set = eval_sets()
    lm2, profile2 = diag.load("shapes-v2", None)
    gens = diag.generate(lm2, profile2, v2_set, "v2eval")
    del lm2
    read = read_records(lm, profile, gens)
    th, th2 = profile.judging_thresholds(), profile2.judging_thresholds()
    out = {"read_by_v1": diag.defect_scores(read, th), "v2_at_generation": diag.defect_scores(gens, th2),
           "green_misbound_per_prompt": {"read_by_v1": diag.prompt_level_scores(read, th),
                                         "v2_at_generation": diag.prompt_level_scores(gens, th2)},
           "v1_profile_sha256": profile.sha256, "v2_profile_sha256": profile2.sha256,
           "control_flag_rate_read": diag.false_flag_rate([g for g in read if not g["defects"]], th),
           "control_flag_rate_generation": diag.false_flag_rate([g for g in gens if not g["defects"]], th2)}
    p = out["green_misbound_per_prompt"]
    log(f"v2 green_misbound per prompt: read by v1 {p['read_by_v1']['precision']:.2f} / {p['read_by_v1']['recall']:.2f} "
        f"(v2 at generation {p['v2_at_generation']['precision']:.2f} / {p['v2_at_generation']['recall']:.2f})")
    for d, v in out["read_by_v1"].items():
        w = out["v2_at_generation"][d]
        log(f"v2 {d}: read by v1 precision {v['precision']:.2f} recall {v['recall']:.2f} "
            f"(v2 at generation {w['precision']:.2f} / {w['recall']:.2f})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", nargs="+", default=["miou", "flags", "v2"], choices=["miou", "flags", "v2"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(common.RESULTS / "image_maps.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    log = common.Log("image_maps")
    from auditor.profile import profile_for

    lm = common.load_model()
    profile = profile_for(lm)
    path = Path(args.out)
    res = json.loads(path.read_text()) if path.is_file() else {}
    for part in args.parts:
        res[part] = {"miou": part_miou, "flags": part_flags, "v2": part_v2}[part](lm, profile, log)
    res.update({"benchmark": "image_maps", "command": common.command(), "machine": common.machine(),
                "commit": common.git_commit(), "model": {"name": "shapes-v1", "fingerprint": lm.fingerprint},
                "profile_sha256": profile.sha256, "wall_seconds_last_run": log.elapsed()})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(miou.rnd(res), indent=1))
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
