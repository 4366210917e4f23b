"""auditor.profile and auditor.calibration: the per-model audit profile, its calibration and what audits do with it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tiny_pipelines import one_thread  # noqa: F401  (autouse fixture)
from auditor.calibration import fit_thresholds, self_fit_thresholds, thresholds_at
from auditor.diagnostics import flags_from_records
from auditor.errors import AuditorError
from auditor.profile import AuditProfile, profile_for
from auditor.zoo import MODELS_DIR


@pytest.fixture(autouse=True)
def private_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def v1():
    from auditor.engine.models import load_model

    return load_model("shapes-v1", device="cpu")


def test_bundled_profile_is_complete_and_checked_against_the_model(v1):
    prof = profile_for(v1)
    assert prof.calibrated and prof.maps_ranking == "localisation"
    assert prof.model_fingerprint == v1.fingerprint and prof.head_names == prof.ranking.head_names
    ks = prof.k_per_category()
    assert set(ks) >= {"colour", "shape", "size", "texture"} and all(1 <= k <= 16 for k in ks.values())
    # an unseen category takes the pooled ranking and its k
    assert prof.k_for("vehicle") == prof.k_for("*")
    assert list(prof.maps_source.top_heads("vehicle")) == list(prof.maps_source.top_heads("*"))
    for part in ("relevance", "ranking", "thresholds", "image_checks", "tool"):
        assert part in prof.provenance
    assert prof.thresholds.max_flag_rate == 0.5


def test_profile_round_trip_and_a_changed_file_is_refused(v1, tmp_path):
    prof = profile_for(v1)
    p = prof.save(tmp_path / "p.json")
    again = AuditProfile.load(p)
    assert again.sha256 == prof.sha256 and again.k_per_category() == prof.k_per_category()
    assert again.thresholds == prof.thresholds
    d = json.loads(p.read_text())
    d["thresholds"]["min_peak_ratio"] = 0.0
    p.write_text(json.dumps(d))
    with pytest.raises(AuditorError, match="does not match its sha256"):
        AuditProfile.load(p)


def test_a_profile_for_another_fingerprint_is_refused(cli, tmp_path):
    suite = tmp_path / "s.txt"
    suite.write_text("a red star\n")
    other = MODELS_DIR / "shapes-v2" / "profile.json"
    code, out, err = cli("audit", str(suite), "--model", "shapes-v1", "--profile", str(other), "--out",
                         str(tmp_path / "run"), "--no-pdf", "--seeds", "0", "--steps", "2")
    assert code == 2 and err.count("\n") == 1 and "made for model" in err
    assert not (tmp_path / "run").exists()


def test_image_checks_turned_off_silence_their_thresholds(v1):
    prof = profile_for(v1)
    prof.image_checks = {"drawn": False, "colour": True}
    th = prof.judging_thresholds()
    assert th.min_drawn_share is None and th.min_colour_share == prof.thresholds.min_colour_share
    with pytest.raises(AuditorError, match="unknown image checks"):
        AuditProfile(prof.model_fingerprint, prof.relevance, prof.ranking, "localisation", 8,
                     image_checks={"sky": True})


def _records(values, role="object"):
    """One generation per value: a lone object with that peak_ratio... and a second object to judge it against."""
    return [[{"id": 0, "text": "cat", "role": role, "category": "animal", "binds_to": None,
              "scores": {"peak_ratio": float(v), "concentration": 0.9, "area": 0.1}},
             {"id": 1, "text": "dog", "role": role, "category": "animal", "binds_to": None,
              "scores": {"peak_ratio": 1.0, "concentration": 0.9, "area": 0.1}}] for v in values]


def test_fit_thresholds_meets_the_flag_budget_and_leaves_unseen_rules_off():
    gens = _records(np.linspace(0.05, 1.0, 100))
    th, q, achieved = fit_thresholds(gens, 0.05, 0.5)
    assert achieved["rate"] <= 0.05 and achieved["concepts"] == 200
    assert 0.0 < q < 0.25 and 0.05 <= th.min_peak_ratio <= 0.3
    assert th.position_margin is None and th.min_colour_share is None  # nothing here judges them
    looser, _, more = fit_thresholds(gens, 0.2, 0.5)
    assert more["rate"] > achieved["rate"] and looser.min_peak_ratio > th.min_peak_ratio
    only_first = thresholds_at(gens, q, 0.5, select=lambda g: [0])
    assert only_first.min_peak_ratio < th.min_peak_ratio  # quantiles over the chosen population only
    with pytest.raises(AuditorError, match="budget"):
        fit_thresholds(gens, 0.0, 0.5)


def test_self_calibration_fits_its_second_pass_over_the_generations_its_first_pass_leaves_unflagged():
    # 20 generations where the cat failed outright (low peak ratios), 80 where it is drawn: one pass over every
    # concept spends its budget inside the failures; the second pass fits over what the first left unflagged
    failed, drawn = np.linspace(0.0, 0.1, 20), np.linspace(0.4, 1.0, 80)
    gens = _records(np.concatenate([failed, drawn]))
    one, q1, a1 = fit_thresholds(gens, 0.05, 0.5)
    th, q, achieved = self_fit_thresholds(gens, 0.05, 0.5)
    first = achieved["first_pass"]
    assert first["q"] == q1 and first["rate"] == a1["rate"] and first["generations"] == 100 and achieved["pass"] == 2
    unflagged = [g for g in range(100) if not flags_from_records(gens[g], one)]
    assert first["presumed_failures"] == 100 - len(unflagged) > 0
    keep = set(unflagged)
    assert th == thresholds_at(gens, q, 0.5, select=lambda g: range(2) if g in keep else ())
    assert th.min_peak_ratio > one.min_peak_ratio  # the cut moves out of the failures
    assert achieved["concepts"] == 2 * len(unflagged) and achieved["rate"] <= 0.05
    assert achieved["all_concepts_rate"] > achieved["rate"]
    # a first pass that cannot fit (q = 0: at any q above 0 the tie at 0 is flagged whole, 10 of 80 concepts):
    # what its smallest quantile flags (the tie and the lowest of the rest) is presumed failed, and the second pass
    # fits over the other generations
    tied = _records(np.r_[np.zeros(10), np.linspace(0.4, 1.0, 30)])
    assert fit_thresholds(tied, 0.05, 0.5)[1] == 0.0
    th0, q0, a0 = self_fit_thresholds(tied, 0.05, 0.5)
    assert a0["first_pass"]["q"] == 0.0 and a0["first_pass"]["presumed_failures"] == 11
    assert q0 > 0.0 and a0["concepts"] == 58 and a0["rate"] <= 0.05 and th0.min_peak_ratio > 0.4
    # nothing to presume failed (no tie, nothing flagged at q = 0): the first pass is the answer
    flat = _records(np.ones(40))
    th1, _, a1 = self_fit_thresholds(flat, 0.05, 0.5)
    assert th1 == fit_thresholds(flat, 0.05, 0.5)[0] and a1["pass"] == 1


def test_a_bundled_model_is_calibrated_at_the_guidance_its_audits_use(cli, tmp_path):
    from auditor.zoo import GUIDANCE

    args = ("calibrate", "--model", "shapes-v1", "--budget", "1", "--steps", "1", "--threshold-prompts", "0",
            "--json", "--out")
    code, out, err = cli(*args, str(tmp_path / "a.json"))
    assert code == 0, err
    prov = json.loads(out)["provenance"]
    assert prov["relevance"]["guidance"] == prov["ranking"]["guidance"] == GUIDANCE == 5.0
    code, out, err = cli(*args, str(tmp_path / "b.json"), "--guidance", "3")
    assert code == 0, err
    assert json.loads(out)["provenance"]["ranking"]["guidance"] == 3.0


def test_maps_and_calibrate_generate_a_bundled_model_at_its_own_guidance():
    from types import SimpleNamespace

    from auditor.cli.maps import DEFAULT_GUIDANCE, _guidance_for
    from auditor.zoo import GUIDANCE

    assert _guidance_for(SimpleNamespace(source="bundled"), None) == GUIDANCE
    assert _guidance_for(SimpleNamespace(source="local"), None) == DEFAULT_GUIDANCE
    assert _guidance_for(SimpleNamespace(source="bundled"), 0.0) == 0.0  # a given value, even 0, is kept


@pytest.mark.slow
def test_calibrate_writes_a_complete_profile_and_an_audit_uses_it(model_copy, tmp_path, cli):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat and a blue dog\na green car next to a small house\n")
    code, out, err = cli("calibrate", "--model", str(model_copy), "--prompts", str(prompts), "--budget", "4",
                         "--steps", "2", "--threshold-prompts", "2", "--flag-budget", "0.9", "--json", "--out",
                         str(tmp_path / "prof.json"))  # a random model, 2 generations: a lower budget fits no cut
    assert code == 0, err
    summary = json.loads(out)
    assert summary["calibrated"] and summary["maps_ranking"] == "localisation"
    prov = summary["provenance"]
    assert str(prompts) in prov["ranking"]["prompts"] and prov["thresholds"]["flag_budget"] == 0.9
    assert prov["ranking"]["guidance"] == prov["thresholds"]["guidance"] == 7.5  # a folder's: the default
    prof = AuditProfile.load(tmp_path / "prof.json")
    assert prof.ranking.budget_prompts == 4 and prof.relevance.budget_prompts == 4
    suite = tmp_path / "s.txt"
    suite.write_text("a red cat\n")
    code, out, err = cli("audit", str(suite), "--model", str(model_copy), "--out", str(tmp_path / "run"),
                         "--no-pdf", "--seeds", "0", "--steps", "2", "--json")
    assert code == 0, err
    from auditor.store import RunStore

    with RunStore.open(tmp_path / "run") as store:
        m = store.manifest
    assert m["calibrated"] is True and m["profile"]["sha256"] == prof.sha256


@pytest.mark.slow
def test_an_uncalibrated_profile_maps_flags_nothing_and_says_so(model_copy, tmp_path, cli):
    code, out, err = cli("calibrate", "--model", str(model_copy), "--budget", "2", "--steps", "2",
                         "--threshold-prompts", "0", "--json")
    assert code == 0, err
    assert json.loads(out)["calibrated"] is False
    suite = tmp_path / "s.txt"
    suite.write_text("a red cat\n")
    code, out, err = cli("audit", str(suite), "--model", str(model_copy), "--out", str(tmp_path / "run"),
                         "--no-pdf", "--seeds", "0", "--steps", "2", "--fail-on", "any")
    assert code == 0, err
    assert "uncalibrated" in err and "--fail-on any cannot fail" in err and err.count("\n") >= 1
    from auditor.store import RunStore

    with RunStore.open(tmp_path / "run") as store:
        assert store.manifest["calibrated"] is False and store.manifest["thresholds"] is None
        gens = store.generations()
    assert all(not c["flags"] for g in gens for c in g["concepts"]) and gens[0]["concepts"]
    assert all("peak" in c["scores"] or c["scores"] for g in gens for c in g["concepts"])
    html = (tmp_path / "run" / "report.html").read_text()
    assert "Uncalibrated" in html


def test_an_uncalibrated_bundled_model_is_not_judged(cli, tmp_path):
    """shapes-dit ships no thresholds (its oracle tune could not separate failures): its audit says so, never PASS."""
    code, out, err = cli("audit", "shapes-default", "--model", "shapes-dit", "--out", str(tmp_path / "run"),
                         "--no-pdf", "--seeds", "0", "--steps", "2")
    assert code == 0, err
    assert "acceptance: not judged (uncalibrated)" in out and "PASS" not in out and "uncalibrated" in err


def test_a_repeated_extreme_value_is_flagged_whole_and_the_quantile_taken_over_the_rest():
    # 10% of the colour words have none of their colour at all (share exactly 0): a quantile below that tie must
    # still flag them, or the rule could never fire on the clearest failures; and the tie must not use up q, or
    # the weak shares among the others (a blended rim of the colour) would never be flagged
    rest = [0.2 + i / 200 for i in range(10, 100)]
    gens = [[{"id": 0, "text": "red", "role": "attribute", "category": "colour", "binds_to": None,
              "scores": {"colour_share": 0.0 if i < 10 else rest[i - 10]}}] for i in range(100)]
    th = thresholds_at(gens, 0.05, 0.5)
    assert th.min_colour_share == pytest.approx(float(np.quantile(rest, 0.05)))
    flagged = sum(flags_from_records(g, th) != [] for g in gens)
    assert flagged == 10 + 5  # the tie whole, then about q of the 90 others
    assert thresholds_at(gens, 0.0, 0.5).min_colour_share == 0.0  # q = 0 flags nothing
    # a value most concepts share is no state of its own: the plain quantile
    common = [[{**g[0], "scores": {"colour_share": 0.0 if i < 60 else 0.5}}] for i, g in enumerate(gens)]
    assert thresholds_at(common, 0.05, 0.5).min_colour_share == 0.0
