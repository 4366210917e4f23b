"""Property tests over the command line's arguments and the suite loader: whatever the input, the tool ends in exit
0, 1 or 2, never a traceback, and an exit 2 is one line ``auditor: error: …`` on stderr. Values are validated as
given, never replaced (0 is a value, not "unset"). Plus the refusals that need the loaded model (steps past the
scheduler's training steps, k past the model's heads, a NaN or truncated relevance matrix, seeds past SQLite's
integers), each before anything is written."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fake_run
from auditor.errors import AuditorError
from auditor.store import MAX_SEED

TINY = """\
name: tiny
defaults: {steps: 2, seeds: [0], guidance: 5.0, resolution: 64}
prompts:
  - {id: p1, text: a red star}
"""
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class _Reached(BaseException):  # past the CLI's catch-all for bugs
    """The audit got past every check of its arguments to the point of loading the model."""


def _run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from auditor.cli import main

    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _assert_clean(code: int, err: str) -> None:
    assert code in (0, 1, 2), code
    assert "Traceback" not in err and "internal error" not in err, err
    if code == 2:
        assert err.count("\n") == 1 and err.startswith("auditor: error: "), err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("suite") / "tiny.yaml"
    p.write_text(TINY)
    return p


_ints = st.one_of(st.integers(-5, 1100), st.sampled_from([0, -1, 2 ** 63 - 1, 2 ** 63, 2 ** 64, -(2 ** 63)]),
                  st.integers())
_int_text = st.one_of(_ints.map(str), st.text(max_size=8))
_seed_text = st.one_of(st.lists(_ints, max_size=4).map(lambda xs: ",".join(map(str, xs))), st.text(max_size=12))


@FAST
@given(seeds=st.none() | _seed_text, steps=st.none() | _int_text, k=st.none() | _int_text,
       fail_on=st.none() | st.sampled_from(["missing", "any", "regression", ""]) | st.text(max_size=6),
       suite=st.sampled_from(["tiny", "missing", "text"]), junk=st.text(max_size=10))
def test_audit_arguments_are_validated_never_replaced(tiny, capsys, monkeypatch, seeds, steps, k, fail_on, suite, junk):
    import auditor.engine.models as models
    import auditor.runs as runs

    def reached(*args, **kwargs):
        raise _Reached

    monkeypatch.setattr(models, "load_model", reached)
    monkeypatch.setattr(runs, "load_model", reached)  # the audit's own reference to it
    out = Path(tempfile.mkdtemp()) / "run"
    suite_arg = {"tiny": str(tiny), "missing": str(out.parent / "none.yaml"), "text": junk}[suite]
    argv = ["audit", suite_arg, "--out", str(out), "--no-pdf"]
    for name, value in (("--seeds", seeds), ("--steps", steps), ("--k", k), ("--fail-on", fail_on)):
        if value is not None:
            argv += [name, value]
    try:
        code, _, err = _run_cli(argv, capsys)
    except _Reached:
        # Only values the audit can honour get this far, exactly as given.
        assert steps is None or int(steps) >= 1
        assert k is None or int(k) >= 1
        if seeds is not None:
            parsed = [int(s) for s in seeds.split(",") if s.strip()]
            assert parsed and all(0 <= s <= MAX_SEED for s in parsed) and len(set(parsed)) == len(parsed)
        assert fail_on in (None, "missing", "misplaced", "misinterpreted", "any")
        return
    _assert_clean(code, err)
    assert code == 2
    assert not out.exists()  # refused before anything was written


_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 7.5]))


@FAST
@given(cmd=st.sampled_from(["maps", "calibrate"]), steps=st.none() | _ints, seed=st.none() | _ints,
       k=st.none() | _ints, guidance=st.none() | _floats, budget=st.none() | _ints)
def test_maps_and_calibrate_values_are_validated_before_the_model_loads(capsys, monkeypatch, cmd, steps, seed, k,
                                                                          guidance, budget):
    import auditor.engine.models as models
    import auditor.runs as runs

    def reached(*args, **kwargs):
        raise _Reached

    monkeypatch.setattr(models, "load_model", reached)
    monkeypatch.setattr(runs, "load_model", reached)  # the audit's own reference to it
    out = Path(tempfile.mkdtemp()) / "out"
    argv = [cmd, *(["a red star"] if cmd == "maps" else []), "--out", str(out)]
    for name, value in (("--steps", steps), ("--seed", seed), ("--k", k), ("--guidance", guidance)):
        if value is not None:
            argv += [name, str(value)]
    if cmd == "calibrate" and budget is not None:
        argv += ["--budget", str(budget)]
    try:
        code, _, err = _run_cli(argv, capsys)
    except _Reached:
        assert steps is None or steps >= 1
        assert seed is None or 0 <= seed <= MAX_SEED
        assert k is None or k >= 1
        assert guidance is None or (guidance == guidance and abs(guidance) != float("inf") and guidance >= 0)
        assert cmd != "calibrate" or budget is None or budget >= 1
        return
    _assert_clean(code, err)
    assert code == 2 and not out.exists()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.text(max_size=60), tokenizer=st.sampled_from(["none", "clip"]), as_json=st.booleans())
def test_concepts_of_any_prompt_end_in_0_or_2(capsys, prompt, tokenizer, as_json):
    code, out, err = _run_cli(["concepts", prompt, "--tokenizer", tokenizer] + ["--json"] * as_json, capsys)
    _assert_clean(code, err)
    if code == 0 and as_json:
        json.loads(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    from auditor.report.render import publish

    base = tmp_path_factory.mktemp("prop-runs")
    a = fake_run.build(base / "a", seeds=(0, 1), prompts=fake_run.PROMPTS[:2])
    b = fake_run.build(base / "b", seeds=(0, 1), prompts=fake_run.PROMPTS[:2], forced={("two-objects", "red"): 1.0})
    publish(a, pdf=False)
    (base / "file.txt").write_text("not a run")
    (base / "empty").mkdir()
    return {"a": a, "b": b, "unfinished": fake_run.build(base / "u", seeds=(0, 1), prompts=fake_run.PROMPTS[:2],
                                                         finish=False),
            "file": base / "file.txt", "empty": base / "empty", "none": base / "none"}


_run_arg = st.sampled_from(["a", "b", "unfinished", "file", "empty", "none"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=_run_arg, b=_run_arg, max_reg=st.none() | _int_text,
       fail_on=st.none() | st.sampled_from(["regression"]) | st.text(max_size=5),
       allow_partial=st.booleans(), as_json=st.booleans())
def test_compare_arguments_end_in_0_1_or_2(runs, capsys, a, b, max_reg, fail_on, allow_partial, as_json):
    out = Path(tempfile.mkdtemp()) / "cmp"
    argv = ["compare", str(runs[a]), str(runs[b]), "--out", str(out), "--no-pdf"]
    for name, value in (("--max-regressions", max_reg), ("--fail-on", fail_on)):
        if value is not None:
            argv += [name, value]
    argv += ["--allow-partial"] * allow_partial + ["--json"] * as_json
    code, stdout, err = _run_cli(argv, capsys)
    _assert_clean(code, err)
    if {a, b} <= {"a", "b", "unfinished"} and "unfinished" in (a, b) and not allow_partial:
        assert code == 2  # an unfinished run is never compared unasked
    if code != 2 and as_json:
        json.loads(stdout)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cmd=st.sampled_from(["report", "verify"]), target=_run_arg | st.text(max_size=10),
       flags=st.lists(st.sampled_from(["--no-pdf", "--force", "--json", "--bogus"]), max_size=3, unique=True))
def test_report_and_verify_arguments_end_in_0_1_or_2(runs, capsys, cmd, target, flags):
    path = str(runs[target]) if target in runs else target
    if cmd == "report":
        flags = [f for f in flags if f != "--no-pdf"] + ["--no-pdf"]  # the PDF costs seconds and proves nothing here
    if cmd == "verify":
        flags = [f for f in flags if f not in ("--no-pdf", "--force")]
    code, _, err = _run_cli([cmd, path, *flags], capsys)
    _assert_clean(code, err)


# --- the suite loader --------------------------------------------------------------------------------------------

_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=12))
_keys = st.sampled_from(["name", "description", "defaults", "acceptance", "prompts", "id", "text", "tags", "words",
                         "steps", "seeds", "guidance", "resolution", "category", "count", "max_flag_rate",
                         "required_categories", "max_flag_rate_per_category", "any", "colour"]) | st.text(max_size=6)
_value = st.recursive(_scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=4),
                      max_leaves=12)
_prompt = st.fixed_dictionaries({"id": _scalar, "text": _scalar}, optional={"tags": _value, "words": _value})
_suite = st.fixed_dictionaries({"name": _scalar, "prompts": st.lists(_prompt, max_size=3) | _value},
                               optional={"defaults": st.dictionaries(_keys, _value, max_size=4) | _value,
                                         "acceptance": st.dictionaries(_keys, _value, max_size=3) | _value,
                                         "description": _scalar})


@settings(max_examples=200, deadline=None)
@given(data=_suite | _value, as_txt=st.booleans(), raw=st.none() | st.binary(max_size=64))
def test_the_suite_loader_returns_a_suite_or_one_line_error(data, as_txt, raw):
    from auditor.suites import Suite, load_suite

    folder = Path(tempfile.mkdtemp())
    path = folder / ("suite.txt" if as_txt else "suite.yaml")
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text(yaml.safe_dump(data, allow_unicode=True) if not as_txt else str(data), encoding="utf-8")
    try:
        suite = load_suite(path)
    except AuditorError as exc:
        assert "\n" not in str(exc) and path.name in str(exc)
        return
    assert isinstance(suite, Suite) and suite.prompts
    for seed in suite.defaults.seeds:
        assert 0 <= seed <= MAX_SEED
    assert suite.defaults.steps >= 1


def test_suite_seeds_past_sqlite_integers_are_refused(tmp_path):
    from auditor.suites import load_suite

    p = tmp_path / "big.yaml"
    p.write_text(TINY.replace("seeds: [0]", f"seeds: [{2 ** 63}]"))
    with pytest.raises(AuditorError, match=r"big\.yaml line 2: field 'defaults.seeds'"):
        load_suite(p)


# --- refusals that need the model: one line, exit 2, nothing written ----------------------------------------------


def _one_line(result):
    code, _, err = result
    assert code == 2 and err.count("\n") == 1 and err.startswith("auditor: error: ") and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def bundled_relevance():
    from auditor.engine.relevance import RelevanceMatrix
    from auditor.zoo import bundled_model

    return RelevanceMatrix.load(bundled_model("shapes-v1").path / "relevance.npz")


def test_values_the_model_cannot_honour_are_refused(cli, tiny, tmp_path, bundled_relevance):
    out = tmp_path / "run"
    err = _one_line(cli("audit", str(tiny), "--out", str(out), "--steps", "1001", "--no-pdf"))
    assert "--steps 1001" in err and "1000" in err
    heads = len(bundled_relevance.head_names)
    assert f"--k {heads + 1}" in _one_line(cli("audit", str(tiny), "--out", str(out), "--k", str(heads + 1)))
    assert "--steps 0" in _one_line(cli("audit", str(tiny), "--out", str(out), "--steps", "0"))
    assert "--k 0" in _one_line(cli("audit", str(tiny), "--out", str(out), "--k", "0"))
    for seed in (2 ** 63, 2 ** 64):
        assert "--seeds" in _one_line(cli("audit", str(tiny), "--out", str(out), "--seeds", f"0,{seed}"))
    assert not out.exists()
    err = _one_line(cli("maps", "a red star", "--steps", "1001", "--out", str(out)))
    assert "--steps 1001" in err and not out.exists()


def test_a_nan_or_truncated_relevance_matrix_is_refused(cli, tiny, tmp_path, bundled_relevance):
    import dataclasses

    nan = dataclasses.replace(bundled_relevance, matrix=np.full_like(bundled_relevance.matrix, np.nan))
    path = nan.save(tmp_path / "nan")
    out = tmp_path / "run"
    assert "NaN" in _one_line(cli("audit", str(tiny), "--out", str(out), "--relevance", str(path), "--no-pdf"))
    good = bundled_relevance.save(tmp_path / "cut")
    good.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "unreadable relevance matrix" in _one_line(cli("audit", str(tiny), "--out", str(out), "--relevance",
                                                          str(good), "--no-pdf"))
    assert not out.exists()


def test_a_truncated_relevance_file_in_a_run_folder_is_one_line(tmp_path, cli):
    run = fake_run.build(tmp_path / "run")
    rel = run / "relevance.npz"
    rel.write_bytes(rel.read_bytes()[:100])
    err = _one_line(cli("report", str(run), "--no-pdf", "--force"))
    assert "relevance.npz" in err


def test_usage_errors_are_one_line(cli):
    for args in (["audit"], ["audit", "x", "--steps", "many"], ["nosuch"], ["compare", "a"], ["verify"]):
        err = _one_line(cli(*args))
        assert "--help" in err
    assert os.environ.get("AUDITOR_TRACEBACK") is None
