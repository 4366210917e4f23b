"""Regression compare: the statistics, a planted regression found (and none in identical runs), the report, the gate."""

from __future__ import annotations

import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

import fake_run
from auditor.compare import POLICY, compare_runs, gate, to_text
from auditor.compare_stats import mcnemar_exact, paired_bootstrap
from auditor.errors import AuditorError
from auditor.report.compare_report import write_compare

RED = ("two-objects", "red")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("compare")
    return {
        "a": fake_run.build(base / "a", forced={RED: 0.0}),
        "same": fake_run.build(base / "same", forced={RED: 0.0}),
        "b": fake_run.build(base / "b", forced={RED: 1.0}, relevance_shift=0.4),
    }


def test_mcnemar_exact_matches_the_binomial_test():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 3) == 0.25
    assert mcnemar_exact(0, 6) == 0.03125  # the fewest discordant pairs that can reach p < 0.05
    assert mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)
    assert mcnemar_exact(4, 4) == 1.0 and mcnemar_exact(3, 9) == mcnemar_exact(9, 3)


def test_paired_bootstrap_is_seeded_and_brackets_the_mean():
    assert paired_bootstrap([0.5, 0.5, 0.5]) == (0.5, 0.5)
    d = [0.1, 0.4, -0.2, 0.3, 0.0, 0.25]
    lo, hi = paired_bootstrap(d)
    assert lo < sum(d) / len(d) < hi and paired_bootstrap(d) == (lo, hi)


def test_policy_counts_large_or_significant_increases():
    assert POLICY.classify(0.67, 0.25, 0, 2) == "regression"  # large, too few seeds to be significant
    assert POLICY.classify(0.2, 0.01, 1, 12) == "regression"  # small but significant
    assert POLICY.classify(0.2, 0.3, 1, 3) is None
    assert POLICY.classify(-0.6, 0.25, 3, 0) == "improvement"


def test_the_planted_regression_is_found_and_nothing_else(runs):
    c = compare_runs(runs["a"], runs["b"])
    found = [(r["level"], r.get("prompt_id"), r.get("concept")) for r in c["regressions"]]
    assert found == [("concept", "two-objects", "red (attribute of cube)")]
    red = c["regressions"][0]
    assert (red["rate_a"], red["rate_b"], red["broken"], red["fixed"], red["p"]) == (0.0, 1.0, 3, 0, 0.25)
    assert red["scores"]["concentration"]["clear"] and red["scores"]["concentration"]["mean_delta"] < 0
    assert red["b_says"] == "the colour probably went to another object"  # what B's flags on it say
    assert to_text(c).splitlines()[1].endswith("— in B, the colour probably went to another object")
    assert c["improvements"] == [] and c["warnings"] == []
    assert gate(c, None, "regression") and gate(c, 0, None) and gate(c, 1, None) is None


def test_identical_runs_show_no_change(runs):
    c = compare_runs(runs["a"], runs["same"])
    assert c["regressions"] == [] and c["improvements"] == []
    assert all(x["broken"] == x["fixed"] == 0 for x in c["concepts"])
    assert c["heads"]["comparable"] and set(c["heads"]["overlap"].values()) == {1.0}
    assert gate(c, 0, "regression") is None


def test_a_whole_category_breaking_is_a_significant_category_regression(tmp_path, runs):
    colours = {(p[0], w): 1.0 for p in fake_run.PROMPTS for (w, _, cat, _) in p[2] if cat == "colour"}
    broken = fake_run.build(tmp_path / "colours", forced={**colours, RED: 0.0})
    c = compare_runs(runs["a"], broken)
    colour = next(r for r in c["regressions"] if r["level"] == "category")
    assert colour["category"] == "colour" and colour["p"] < 0.05


def test_a_tag_whose_prompts_break_is_a_tag_regression(tmp_path, runs):
    polysemy = next(p for p in fake_run.PROMPTS if p[0] == "polysemy")
    broken = fake_run.build(tmp_path / "tagged", forced={RED: 0.0, **{("polysemy", w): 1.0 for w, *_ in polysemy[2]}})
    c = compare_runs(runs["a"], broken)
    tags = {r["tag"]: r for r in c["tags"]}
    assert set(tags) == {"pair", "binding", "polysemy"} and tags["polysemy"]["prompts"] == 1
    assert tags["polysemy"]["verdict"] == "regression" and tags["binding"]["verdict"] is None
    assert any(r["level"] == "tag" and r["tag"] == "polysemy" for r in c["regressions"])
    from auditor.compare import to_text
    assert "tag polysemy (1 prompt)" in to_text(c)


def test_heads_of_a_fine_tune_are_compared_and_other_architectures_are_not(tmp_path, runs):
    heads = compare_runs(runs["a"], runs["b"])["heads"]
    assert heads["comparable"] and min(heads["overlap"].values()) < 1.0
    assert len(heads["changed"]) == 10 and heads["changed"][0]["change"] >= heads["changed"][-1]["change"]
    other = fake_run.build(tmp_path / "other", forced={RED: 0.0})
    _rename_heads(other)
    heads = compare_runs(runs["a"], other)["heads"]
    assert not heads["comparable"] and "different architectures" in heads["note"]


def _rename_heads(run: Path) -> None:
    import numpy as np

    from auditor.store import RunStore

    with np.load(run / "relevance.npz") as z:
        cats, matrix = list(z["categories"]), z["matrix"]
    with RunStore.open(run) as store:
        store.save_relevance(cats, [f"other_unet.{i}#h0" for i in range(matrix.shape[1])], matrix)


def test_different_prompts_are_compared_on_the_common_ones_with_a_warning(tmp_path, runs):
    fewer = fake_run.build(tmp_path / "fewer", forced={RED: 1.0}, prompts=fake_run.PROMPTS[:2])
    c = compare_runs(runs["a"], fewer)
    assert c["common_prompts"] == 2 and any("only in A (hostile-text)" in w for w in c["warnings"])
    assert [r.get("concept") for r in c["regressions"]] == ["red (attribute of cube)"]


@pytest.mark.parametrize("kwargs, message", [
    ({"suite_name": "another-suite"}, "different suites"),
    ({"seeds": (0, 1)}, "different seeds"),
])
def test_incomparable_runs_are_refused(tmp_path, runs, kwargs, message):
    other = fake_run.build(tmp_path / "other", **kwargs)
    with pytest.raises(AuditorError, match=message):
        compare_runs(runs["a"], other)


class _Imgs(HTMLParser):
    def __init__(self, html):
        super().__init__()
        self.srcs = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def test_compare_report_shows_the_regressed_maps_side_by_side(tmp_path, runs):
    c = compare_runs(runs["a"], runs["b"])
    written = write_compare(c, tmp_path / "cmp", pdf=True)
    assert [p.name for p in written] == ["compare.json", "compare.html", "compare.pdf", "checksums.sha256"]
    html = (tmp_path / "cmp" / "compare.html").read_text()
    srcs = _Imgs(html).srcs
    # red in 3 seeds x (image + selective map) x 2 runs, plus the head figure; all copies inside the compare folder
    assert len(srcs) == 13 and all((tmp_path / "cmp" / s).is_file() and s.startswith(("runs/", "figures/")) for s in srcs)
    assert "red (attribute of cube)" in html and "McNemar" in html and "&lt;script&gt;" not in html  # no hostile prompt regressed
    assert "in B: the colour probably went to another object" in html
    ids, hrefs = set(re.findall(r'id="([^"]+)"', html)), re.findall(r'href="#([^"]+)"', html)
    assert "ev-1" in hrefs and set(hrefs) <= ids  # the regressions table links to each regressed concept's evidence


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "auditor", "compare", *args], capture_output=True, text=True, timeout=120)


def test_cli_exit_codes(tmp_path, runs):
    a, b = str(runs["a"]), str(runs["b"])
    out = str(tmp_path / "out")
    failed = _cli(a, b, "--out", out, "--no-pdf", "--fail-on", "regression")
    assert failed.returncode == 1 and "gate failed: 1 regression" in failed.stderr
    assert "regression  two-objects: red" in failed.stdout and (tmp_path / "out" / "compare.html").is_file()
    assert _cli(a, b, "--out", out, "--no-pdf", "--max-regressions", "1", "--json").returncode == 0
    other = fake_run.build(tmp_path / "other", suite_name="another-suite")
    for args, message in (([a, str(tmp_path / "nope")], "no such run folder"),
                          ([a, str(tmp_path)], "not an auditor run folder"),
                          ([a, str(other)], "different suites"),
                          ([a, b, "--fail-on", "anything"], "--fail-on anything")):
        bad = _cli(*args, "--out", out, "--no-pdf")
        assert bad.returncode == 2, bad.stderr
        assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("auditor: error: ") and message in bad.stderr
