"""Prompt suites (auditor.suites): valid files load into frozen records; every bad input is an AuditorError that
names the file, the line and the field, and through the CLI exits 2 with one line on stderr."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from auditor.errors import AuditorError
from auditor.resources import suites_dir
from auditor.suites import check_suite, load_suite

GOOD = """\
name: demo
description: a small suite
defaults:
  steps: 12
  seeds: [0, 3]
  guidance: 7
  resolution: [64, 128]
acceptance:
  max_flag_rate: {missing: 0.1, any: 0.3}
  max_flag_rate_per_category: {colour: 0.2}
  required_categories: [colour]
prompts:
  - id: p1
    text: an orange cat
    tags: [polysemy]
    words: {orange: {category: colour}}
  - id: 2
    text: "  a red   car  "
"""


def write(tmp_path: Path, text: str | bytes, name: str = "suite.yaml") -> Path:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def test_good_suite_loads(tmp_path):
    path = write(tmp_path, GOOD)
    s = load_suite(path)
    assert (s.name, s.description) == ("demo", "a small suite")
    assert (s.defaults.steps, s.defaults.seeds, s.defaults.guidance, s.defaults.resolution) == (12, (0, 3), 7.0, (64, 128))
    assert [p.id for p in s.prompts] == ["p1", "2"]
    assert s.prompts[1].text == "a red car"  # whitespace collapsed
    assert s.prompt("p1").words["orange"].category == "colour"
    assert s.acceptance.max_flag_rate == {"missing": 0.1, "any": 0.3}
    assert s.acceptance.required_categories == ("colour",)
    assert s.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert dict(s.lines) == {"p1": 13, "2": 17}
    with pytest.raises(Exception):
        s.prompts[0].text = "changed"  # records are frozen


def test_defaults_when_absent(tmp_path):
    s = load_suite(write(tmp_path, "name: x\nprompts:\n  - {id: a, text: a cat}\ndefaults: {resolution: 256}\n"))
    assert (s.defaults.steps, s.defaults.seeds, s.defaults.guidance, s.defaults.resolution) == (30, (0,), 7.5, (256, 256))
    assert s.acceptance is None


def test_txt_suite(tmp_path):
    s = load_suite(write(tmp_path, "# header\n\na red cat\n   \n# note\na blue dog\n", "mine.txt"))
    assert s.name == "mine"
    assert [(p.id, p.text) for p in s.prompts] == [("p1", "a red cat"), ("p2", "a blue dog")]
    assert dict(s.lines) == {"p1": 3, "p2": 6}


BAD = [
    # (file content, the message must contain this)
    pytest.param("name: x\nprompts:\n  - id: p1\n    text: a cat\n    tags: oops: x\n",
                 "suite.yaml line 5: invalid YAML: mapping values are not allowed here", id="malformed-yaml"),
    pytest.param("name: x\nprompts:\n  - id: p1\n    text: a cat\n    colour: red\n",
                 "suite.yaml line 5: prompt 'p1': unknown key 'colour' (allowed: id, text, tags, words)",
                 id="unknown-prompt-key"),
    pytest.param("name: x\nseed: 3\nprompts:\n  - {id: p1, text: a cat}\n",
                 "suite.yaml line 2: unknown key 'seed' (allowed: name, description, defaults, acceptance, prompts)",
                 id="unknown-top-key"),
    pytest.param("name: x\ndefaults:\n  steps: 30\n  sampler: ddim\nprompts:\n  - {id: p1, text: a cat}\n",
                 "suite.yaml line 4: field 'defaults': unknown key 'sampler'", id="unknown-defaults-key"),
    pytest.param("name: x\nprompts:\n  - id: ''\n    text: a cat\n", "suite.yaml line 3: prompt #1 field 'id' is empty",
                 id="empty-id"),
    pytest.param("name: x\nprompts:\n  - id: p1\n    text: a cat\n  - id: p1\n    text: a dog\n",
                 "suite.yaml line 5: duplicate prompt id 'p1' (first on line 3)", id="duplicate-id"),
    pytest.param("name: x\nprompts:\n  - id: p1\n    text: a cat\n  - id: p7\n    text: '   '\n",
                 "suite.yaml line 6: prompt 'p7' is empty", id="empty-prompt"),
    pytest.param("name: x\nprompts:\n  - id: p1\n", "suite.yaml line 3: prompt 'p1': missing field 'text'",
                 id="missing-text"),
    pytest.param("name: x\nprompts: []\n", "suite.yaml line 2: field 'prompts': list should have at least 1 item",
                 id="no-prompts"),
    pytest.param("name: x\ndefaults:\n  steps: thirty\nprompts:\n  - {id: p1, text: a cat}\n",
                 "suite.yaml line 3: field 'defaults.steps': input should be a valid integer", id="wrong-type-steps"),
    pytest.param("name: x\ndefaults:\n  seeds: [0, a]\nprompts:\n  - {id: p1, text: a cat}\n",
                 "suite.yaml line 3: field 'defaults.seeds.1': input should be a valid integer", id="wrong-type-seed"),
    pytest.param("name: x\ndefaults: {resolution: 100}\nprompts:\n  - {id: p1, text: a cat}\n",
                 "suite.yaml line 2: field 'defaults.resolution': resolution must be positive multiples of 8",
                 id="bad-resolution"),
    pytest.param("name: x\nprompts:\n  - id: p1\n    text: yes\n",
                 "suite.yaml line 4: prompt 'p1': input should be a valid string", id="wrong-type-text"),
    pytest.param("name: x\nprompts:\n  - id: p1\n    text: a cat\n    tags: [a, 3]\n",
                 "suite.yaml line 5: prompt 'p1' field 'tags.1': input should be a valid string", id="wrong-type-tag"),
    pytest.param("name: x\nprompts: {a: 1}\n", "suite.yaml line 2: field 'prompts': input should be a valid list",
                 id="prompts-not-list"),
    pytest.param("name: x\nprompts:\n  - id: p1\n    text: a cat\n    words: {dog: {category: animal}}\n",
                 "suite.yaml line 3: prompt 'p1': override word 'dog' does not occur in the prompt", id="override-word"),
    pytest.param("name: x\nprompts:\n  - id: p1\n    text: a cat\n    words: {cat: {category: animals}}\n",
                 "suite.yaml line 5: prompt 'p1' word 'cat' field 'category': unknown category 'animals'",
                 id="override-category"),
    pytest.param("name: x\nacceptance: {max_flag_rate: {wrong: 0.1}}\nprompts:\n  - {id: p1, text: a cat}\n",
                 "suite.yaml line 2: field 'acceptance.max_flag_rate.wrong': input should be 'missing'",
                 id="acceptance-flag-type"),
    pytest.param("name: x\nacceptance:\n  max_flag_rate: {any: 1.5}\nprompts:\n  - {id: p1, text: a cat}\n",
                 "suite.yaml line 3: field 'acceptance.max_flag_rate': rate for 'any' must be between 0 and 1",
                 id="acceptance-rate"),
    pytest.param("name: x\nname: y\nprompts:\n  - {id: p1, text: a cat}\n", "suite.yaml line 2: duplicate key 'name'",
                 id="duplicate-key"),
    pytest.param("", "suite.yaml: the file is empty", id="empty-file"),
    pytest.param("- a\n- b\n", "suite.yaml line 1: expected a mapping", id="not-a-mapping"),
    pytest.param(b"name: x\nprompts:\n  - id: p1\n    text: a caf\xe9\n", "suite.yaml line 4: not UTF-8 text (byte 0xe9)",
                 id="not-utf8"),
]


@pytest.mark.parametrize("content, message", BAD)
def test_bad_suite_is_an_error_naming_file_line_field(tmp_path, content, message):
    with pytest.raises(AuditorError) as err:
        load_suite(write(tmp_path, content))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(AuditorError, match="suite file not found: .*nope.yaml"):
        load_suite(tmp_path / "nope.yaml")
    with pytest.raises(AuditorError, match="not a file"):
        load_suite(tmp_path)


def test_empty_txt_suite(tmp_path):
    with pytest.raises(AuditorError, match=r"empty.txt: no prompts"):
        load_suite(write(tmp_path, "# only a comment\n\n", "empty.txt"))


@pytest.mark.parametrize("content, message", BAD[:3] + BAD[5:7] + BAD[-1:])
def test_cli_bad_suite_exits_2_with_one_line(tmp_path, cli, content, message):
    code, out, err = cli("suite", "check", str(write(tmp_path, content)))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("auditor: error: ") and message in err
    assert "Traceback" not in err


def test_cli_missing_file_in_a_real_process(tmp_path):
    """The console entry point itself: exit code 2, one line on stderr, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "auditor", "suite", "check", str(tmp_path / "missing.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"auditor: error: suite file not found: {tmp_path / 'missing.yaml'}"]


# --- checking and the shipped suites --------------------------------------------------------------------------------


def test_check_counts_concepts_and_warns(tmp_path, clip_tokenizer):
    long = ", ".join(["a small red circle"] * 20)
    path = write(tmp_path, GOOD + f"  - id: long\n    text: {long}\n  - id: ov\n    text: the cat\n"
                 "    words: {the: {category: animal}}\n")
    report = check_suite(load_suite(path), clip_tokenizer)
    assert report.categories["colour"] == 22 and report.categories["animal"] == 2
    assert report.roles["object"] == 23
    assert report.tags == {"polysemy": 1}
    assert any("prompt 'long' (line 19): past the 77-token limit: 15 concept(s) from 'small'" in w
               for w in report.warnings)
    assert any("override word 'the' is not a concept" in w for w in report.warnings)
    assert report.to_json()["concept_categories"] == report.categories


def test_check_required_category_missing(tmp_path):
    path = write(tmp_path, "name: x\nacceptance: {required_categories: [vehicle]}\nprompts:\n  - {id: a, text: a cat}\n")
    with pytest.raises(AuditorError, match="no prompt has a 'vehicle' concept"):
        check_suite(load_suite(path))


@pytest.mark.parametrize("name, at_least", [("fidelity-core", 60), ("polysemy", 20)])
def test_shipped_suites_pass_check(name, at_least, cli):
    path = suites_dir() / f"{name}.yaml"
    suite = load_suite(path)
    assert len(suite.prompts) >= at_least
    assert all(p.tags for p in suite.prompts)
    code, out, err = cli("suite", "check", str(path))
    assert code == 0, err
    assert f"suite {name}: {len(suite.prompts)} prompts" in out


def test_fidelity_core_covers_its_themes():
    suite = load_suite(suites_dir() / "fidelity-core.yaml")
    d = suite.defaults
    assert (d.steps, d.seeds, d.guidance, d.resolution) == (30, (0, 1), 7.5, (512, 512))  # set in the file
    tags = {t for p in suite.prompts for t in p.tags}
    assert {"binding", "count", "spatial", "polysemy", "style", "negation"} <= tags


def test_polysemy_suite_states_every_reading():
    """Each polysemous word appears in two prompts with two different intended categories."""
    suite = load_suite(suites_dir() / "polysemy.yaml")
    assert all(p.words for p in suite.prompts)
    readings: dict[str, set[str]] = {}
    for p in suite.prompts:
        for tag in p.tags[:1]:
            readings.setdefault(tag, set()).update(o.category for o in p.words.values())
    paired = [w for w, cats in readings.items() if len(cats) == 2]
    assert len(paired) >= 10
