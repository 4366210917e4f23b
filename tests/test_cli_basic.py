"""The command line basics: --version, --help of each command, `auditor concepts`, `auditor suite check --json`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from auditor import __version__


def test_version(cli):
    code, out, err = cli("--version")
    assert (code, out, err) == (0, f"auditor {__version__}\n", "")


def test_version_real_process():
    proc = subprocess.run([sys.executable, "-m", "auditor", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"auditor {__version__}"


@pytest.mark.parametrize("args, mentions", [
    ([], ["concepts", "suite"]),
    (["concepts"], ["PROMPT", "--json", "--tokenizer"]),
    (["suite"], ["check"]),
    (["suite", "check"], ["FILE", "--json"]),
])
def test_help(cli, args, mentions):
    code, out, err = cli(*args, "--help")
    assert code == 0 and err == ""
    assert all(m.lower() in out.lower() for m in mentions), out


def test_concepts_json(cli):
    code, out, err = cli("concepts", "a red car next to a blue bicycle", "--json")
    assert code == 0, err
    data = json.loads(out)
    by_text = {c["text"]: c for c in data["concepts"]}
    assert {t: c["category"] for t, c in by_text.items() if c["role"] == "object"} == {"car": "vehicle",
                                                                                    "bicycle": "vehicle"}
    assert (by_text["red"]["binds_to_text"], by_text["red"]["category"]) == ("car", "colour")
    assert (by_text["blue"]["binds_to_text"], by_text["blue"]["category"]) == ("bicycle", "colour")
    assert [by_text[w]["token_indices"] for w in ("red", "car", "next to", "blue", "bicycle")] == [
        [2], [3], [4, 5], [7], [8]]
    rel = by_text["next to"]
    assert (rel["role"], rel["subject_text"], rel["object_text"]) == ("relation", "car", "bicycle")


def test_concepts_table(cli):
    code, out, err = cli("concepts", "an orange star and an orange")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["id", "text", "role", "category", "describes", "tokens"]
    assert any(line.split()[1:5] == ["orange", "attribute", "colour", "->"] for line in lines[1:])
    assert any(line.split()[1:4] == ["orange", "object", "food"] for line in lines[1:])


def test_concepts_without_tokenizer(cli):
    code, out, _ = cli("concepts", "a red car", "--json", "--tokenizer", "none")
    assert code == 0 and all(c["token_indices"] == [] for c in json.loads(out)["concepts"])


def test_concepts_bad_tokenizer_is_one_line(cli, tmp_path):
    code, out, err = cli("concepts", "a red car", "--tokenizer", str(tmp_path / "nowhere"))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("auditor: error: --tokenizer:")


def test_suite_check_json_by_name(cli):
    code, out, err = cli("suite", "check", "polysemy", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["name"] == "polysemy" and data["prompts"] >= 20 and len(data["sha256"]) == 64
    assert data["concept_categories"]["colour"] >= 5 and data["acceptance"]["required_categories"]


def test_usage_error_exits_2(cli):
    code, _, err = cli("concepts")
    assert code == 2 and "Missing argument 'prompt'" in err and "Traceback" not in err


def test_library_errors_are_told_in_the_cli_flags(cli, tmp_path):
    """The library names its parameters (``model shapes-v9: ...``, ```variant=fp16```); the CLI says its flags."""
    from auditor.cli import _in_flags

    code, out, err = cli("audit", "shapes-default", "--model", "shapes-v9", "--out", str(tmp_path / "run"), "--no-pdf")
    assert code == 2 and out == ""
    assert err.startswith("auditor: error: --model shapes-v9: bundled model is not installed") and err.count("\n") == 1
    assert _in_flags("model m: only fp16 weights: pass `variant=fp16`", "model") == \
        "--model m: only fp16 weights: pass --variant fp16"
    assert _in_flags("a.bin: refused; pass `allow_pickle=True` if you trust it", None) == \
        "a.bin: refused; pass --allow-pickle if you trust it"
    assert _in_flags("no matrix: `compute=True`", None) == "no matrix: `compute=True`"  # no flag of that name
