"""The bundled models' audit profiles (``auditor/zoo/models/<name>/profile.json``): how each part was made.

    python -m auditor.zoo.profiles relevance shapes-v2 --budget 256 # the HRV matrix beside the model
    python -m auditor.zoo.profiles ranking shapes-v2 --budget 512   # the localisation ranking (keeps the rest)
    python bench/diagnostics.py tune                                 # the thresholds, by the oracle

- relevance: the HRV matrix shipped beside the model (``relevance.npz``, its own record says how it was made);
- ranking: ``auditor.engine.localise`` on the world's grammar prompts (``grammar.sample_prompts(n, seed=0)``,
  the relevance matrix's prompts), at the world's generation settings (20 steps, guidance 5);
- response_k: 48, the k of the category response since the misinterpretation benchmark measured it (the
  selective k the mIoU sweep chose on its tuning split before the localisation ranking);
- thresholds: shapes-v1's, set by ``bench/diagnostics.py tune`` on the concepts the oracle confirms drawn as
  asked.
shapes-v2, a fine-tune of v1 with planted defects, is judged by v1's ranking, k and thresholds: the yardstick a
regression against v1 is measured with. Its own localisation ranking (256 prompts, k colour 2, shape 1, size 10,
texture 1) was measured too: with v1's thresholds it flagged 9.9% of control concepts, against 6.0% with v1's
ranking, at the same defect recall (docs/benchmarks.md, Diagnostics).
"""

from __future__ import annotations

import argparse
import sys
import time

from auditor import __version__
from auditor.align import text_sequence
from auditor.calibration import word_targets
from auditor.engine.hrv import calibrate_model
from auditor.engine.localise import calibrate_localisation
from auditor.engine.models import load_model
from auditor.engine.relevance import RelevanceMatrix
from auditor.manifest import manifest_base
from auditor.profile import AuditProfile
from auditor.zoo import GUIDANCE, MODELS_DIR, STEPS
from auditor.zoo.grammar import sample_prompts

RESPONSE_K = 48
INHERITS = {"shapes-v2": "shapes-v1"}  # model -> the model whose ranking, k and thresholds judge it


def path_of(name: str):
    return MODELS_DIR / name / "profile.json"


def build_ranking(name: str, budget: int, threads: int, first: int) -> None:
    import torch

    torch.set_num_threads(threads)
    lm = load_model(name, device="cpu")
    old = AuditProfile.load(path_of(name)) if path_of(name).is_file() else None
    rm = RelevanceMatrix.load(MODELS_DIR / name / "relevance.npz")
    provenance = dict(old.provenance) if old else {}
    if name in INHERITS:
        parent = AuditProfile.load(path_of(INHERITS[name]))
        provenance.update({"tool": manifest_base([]).get("tool"), "model_fingerprint": lm.fingerprint,
                           "relevance": {"how": "the HRV matrix shipped beside the model (relevance.npz/.json)",
                                         "sha256": rm.sha256, "prompts": rm.prompt_source,
                                         "budget_prompts": rm.budget_prompts},
                           "ranking": {"inherited_from": INHERITS[name],
                                       "why": "a fine-tune, judged by the yardstick of the model it is compared with",
                                       "command": f"python -m auditor.zoo.profiles ranking {name}",
                                       **{k: v for k, v in parent.provenance["ranking"].items() if k != "command"}},
                           "response_k": parent.provenance.get("response_k"),
                           "image_checks": parent.provenance.get("image_checks")})
        provenance.setdefault("thresholds", "none yet: bench/diagnostics.py tune writes them")
        prof = AuditProfile(lm.fingerprint, rm, parent.ranking, parent.maps_ranking, parent.response_k,
                            old.thresholds if old else None, dict(parent.image_checks), provenance=provenance)
        prof.save(path_of(name))
        print(f"{name}: ranking and k of {INHERITS[name]} -> {path_of(name)} (sha256 {prof.sha256[:12]})")
        return
    prompts = sample_prompts(budget, 0)
    source = f"auditor.zoo.grammar.sample_prompts(n={budget}, seed=0)"
    t0 = time.perf_counter()
    hr = calibrate_localisation(lm.pipe, prompts, word_targets(prompts, text_sequence(lm.pipe)), steps=STEPS,
                                guidance_scale=GUIDANCE, seed=0, first=first, fingerprint=lm.fingerprint,
                                prompt_source=source)
    response_k = min(RESPONSE_K, len(rm.head_names))  # a model with fewer heads reads all of them
    provenance.update({
        "tool": manifest_base([]).get("tool"),
        "model_fingerprint": lm.fingerprint,
        "relevance": {"how": "the HRV matrix shipped beside the model (relevance.npz/.json)", "sha256": rm.sha256,
                      "prompts": rm.prompt_source, "budget_prompts": rm.budget_prompts},
        "ranking": {"how": "localisation (auditor.engine.localise): mean concentration of each head's map of a word, "
                           "k per category by split-half stability", "prompts": source,
                    "budget_prompts": hr.budget_prompts, "converged": hr.converged, "steps": STEPS,
                    "guidance": GUIDANCE, "seed": 0, "version": __version__,
                    "command": f"python -m auditor.zoo.profiles ranking {name} --budget {budget} --first {first}",
                    "seconds": round(time.perf_counter() - t0, 1)},
        "response_k": f"{response_k}: the category response's k since bench/misinterpretation.py measured it"
                      + ("" if response_k == RESPONSE_K else f" ({RESPONSE_K}, capped at the model's heads)"),
        "image_checks": "both on: the shapes world's plain backgrounds and flat colours are what auditor.pixels reads",
    })
    provenance.setdefault("thresholds", "none yet: bench/diagnostics.py tune writes them")
    prof = AuditProfile(lm.fingerprint, rm, hr, "localisation", response_k, old.thresholds if old else None,
                        provenance=provenance)
    prof.save(path_of(name))
    print(f"{name}: {hr.budget_prompts} prompts, converged {hr.converged}, k {hr.k_per_category()} -> "
          f"{path_of(name)} (sha256 {prof.sha256[:12]})")


def build_relevance(name: str, budget: int, threads: int) -> None:
    """Recalibrate the HRV matrix shipped beside a bundled model (relevance.npz/.json), on the world's prompts."""
    import torch

    torch.set_num_threads(threads)
    lm = load_model(name, device="cpu")
    rm = calibrate_model(lm.pipe, bundled=True, fingerprint=lm.fingerprint, budget=budget, steps=STEPS,
                         guidance_scale=GUIDANCE, save=False)
    rm.save(MODELS_DIR / name / "relevance")
    print(f"{name}: HRV matrix on {rm.budget_prompts} prompts, converged {rm.converged} (sha256 {rm.sha256[:12]}); "
          f"rebuild the ranking next, which records it")


def write_thresholds(th, provenance: dict, name: str = "shapes-v1") -> list:
    """Put thresholds into ``name``'s profile and into the profiles that inherit them."""
    written = []
    for target in [name] + [m for m, src in INHERITS.items() if src == name]:
        prof = AuditProfile.load(path_of(target))
        prof.thresholds = th
        prof.provenance = {**prof.provenance, "thresholds": provenance if target == name else
                           {"inherited_from": name, "why": "a fine-tune of it, judged by the reference it is "
                                                           "compared against", **provenance}}
        prof.save(path_of(target))
        written.append(path_of(target))
    return written


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m auditor.zoo.profiles", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("ranking", help="calibrate the localisation ranking of a bundled model into its profile")
    r.add_argument("name")
    r.add_argument("--budget", type=int, default=512)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--first", type=int, default=64, help="prompts before the first agreement check")
    v = sub.add_parser("relevance", help="recalibrate the HRV matrix shipped beside a bundled model")
    v.add_argument("name")
    v.add_argument("--budget", type=int, default=256)
    v.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if not (MODELS_DIR / args.name / "model_index.json").is_file():
        sys.exit(f"auditor: error: no bundled model {args.name!r}")
    if args.cmd == "relevance":
        build_relevance(args.name, args.budget, args.threads)
    else:
        build_ranking(args.name, args.budget, args.threads, args.first)


if __name__ == "__main__":
    main()
