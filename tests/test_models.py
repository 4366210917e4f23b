"""auditor.engine.models (resolve, refuse, fingerprint, load) and the engine's CLI commands."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tiny_pipelines as tp
from tiny_pipelines import one_thread  # noqa: F401  (autouse fixture)
from auditor.engine import models as M
from auditor.errors import AuditorError


@pytest.fixture(autouse=True)
def private_caches(tmp_path, monkeypatch):
    """Fingerprint and relevance caches, and the hub cache, in the test's own folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_unknown_name_and_offline_hub_id_are_one_line_errors():
    with pytest.raises(AuditorError) as e:
        M.load_model("no-such-model")
    assert "no-such-model" in _one_line(e) and "bundled" in str(e.value)
    with pytest.raises(AuditorError) as e:
        M.load_model("someone/some-diffusion-model")
    msg = _one_line(e)
    assert "someone/some-diffusion-model" in msg and "offline" in msg


def test_folder_without_model_index_and_single_files(tmp_path):
    with pytest.raises(AuditorError, match="model_index.json"):
        M.load_model(str(tmp_path))
    f = tmp_path / "model.ckpt"
    f.write_bytes(b"x")
    with pytest.raises(AuditorError, match="single checkpoint file"):
        M.load_model(str(f))


def test_loads_a_local_folder_with_fingerprint(model_copy):
    lm = M.load_model(str(model_copy), device="cpu")
    assert type(lm.pipe).__name__ == "StableDiffusionPipeline" and lm.source == "local" and lm.kind == "sd"
    assert len(lm.fingerprint) == 64 and lm.pipe.safety_checker is None
    assert M.fingerprint_of(lm.pipe) == lm.fingerprint and M.folder_of(lm.pipe) == model_copy
    memo = json.loads((M.cache_dir() / "file-hashes.json").read_text())
    assert len(memo) == len(M.weight_files(model_copy)) == 3  # text encoder, unet, vae
    assert M.fingerprint(model_copy) == lm.fingerprint  # from the memo, same answer
    # a changed weight file changes the fingerprint (size and mtime change the memo key)
    w = model_copy / "vae" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes() + b" ")
    assert M.fingerprint(model_copy) != lm.fingerprint


def test_pickle_weights_refused_unless_allowed(model_copy):
    st = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    pkl = st.with_suffix(".bin")
    st.rename(pkl)
    with pytest.raises(AuditorError) as e:
        M.load_model(str(model_copy))
    assert str(pkl) in _one_line(e) and "`allow_pickle=True`" in str(e.value)
    M.check_weights(model_copy, allow_pickle=True)  # allowed: no complaint


def test_corrupt_safetensors_named(model_copy):
    st = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(AuditorError) as e:
        M.load_model(str(model_copy))
    assert str(st) in _one_line(e) and "corrupt" in str(e.value)
    st.write_bytes(b"\x05\x00")
    with pytest.raises(AuditorError, match="corrupt"):
        M.check_weights(model_copy)


def test_bad_device_and_dtype(model_copy):
    with pytest.raises(AuditorError, match="^dtype float8") as e:
        M.load_model(str(model_copy), dtype="float8")
    assert e.value.argument == "dtype"
    with pytest.raises(AuditorError, match="^device tpu"):
        M.load_model(str(model_copy), device="tpu")


def test_sdxl_folder_loads_as_sdxl(tmp_path):
    tp.sdxl().save_pretrained(tmp_path / "xl", safe_serialization=True)
    lm = M.load_model(str(tmp_path / "xl"), device="cpu")
    assert type(lm.pipe).__name__ == "StableDiffusionXLPipeline" and lm.kind == "sdxl"


def test_relevance_cached_by_fingerprint(model_copy):
    from auditor.engine.hrv import calibrate_model, relevance_for
    from auditor.engine.relevance import cache_path, find_for_pipe

    lm = M.load_model(str(model_copy), device="cpu")
    assert find_for_pipe(lm.pipe) is None
    rm = calibrate_model(lm.pipe, fingerprint=lm.fingerprint, budget=2, steps=1, first=1, height=64, width=64)
    assert rm.model_fingerprint == lm.fingerprint and cache_path(lm.fingerprint).is_file()
    assert "calibration-general.txt" in rm.prompt_source and rm.votes.sum() == 128 * 2 * 1
    assert relevance_for(lm.pipe).sha256 == rm.sha256


def test_cli_calibrate_then_maps(model_copy, tmp_path, cli):
    from auditor.engine.hrv import calibrate

    code, out, err = cli("calibrate", "--model", str(model_copy), "--budget", "2", "--steps", "1", "--json",
                         "--threshold-prompts", "0", "--out", str(tmp_path / "cal.json"))
    assert code == 0, err
    summary = json.loads(out)
    prov = summary["provenance"]
    assert prov["relevance"]["budget_prompts"] == 2 and prov["ranking"]["budget_prompts"] == 2
    assert "calibration-general.txt" in prov["ranking"]["prompts"] and summary["calibrated"] is False
    assert (tmp_path / "cal.json").is_file() and "relevance" in err and "ranking" in err
    # two prompts cannot give all 33 lexicon categories votes: map with a small matrix that has the prompt's two
    lm = M.load_model(str(model_copy), device="cpu")
    lex = {"colour": ["red", "blue"], "animal": ["cat", "dog"]}
    calibrate(lm.pipe, ["a red cat", "a blue dog"] * 2, lex, steps=2, k=4, first=2).save(tmp_path / "rel")
    code, out, err = cli("maps", "a red cat", "--model", str(model_copy), "--method", "all", "--k", "4",
                         "--steps", "2", "--out", str(tmp_path / "maps"), "--relevance", str(tmp_path / "rel.npz"),
                         "--json")
    assert code == 0, err
    rec = json.loads(out)
    assert [(c["text"], c["category"]) for c in rec["concepts"]] == [("red", "colour"), ("cat", "animal")]
    assert (tmp_path / "maps" / "image.png").is_file()
    for c in rec["concepts"]:
        assert set(c["maps"]) == {"selective", "all_heads", "bottom_k", "weighted"}
        assert (tmp_path / "maps" / c["overlay"].split("/")[-1]).is_file()


def test_cli_errors_are_one_line(cli, tmp_path):
    code, out, err = cli("maps", "a red cat", "--model", "nope-v9")
    assert code == 2 and err.count("\n") == 1 and err.startswith("auditor: error: --model nope-v9")
    code, out, err = cli("calibrate", "--model", "someone/model", "--budget", "4")
    assert code == 2 and "offline" in err and err.count("\n") == 1
    code, out, err = cli("maps", "a red cat", "--method", "best")
    assert code == 2 and "--method best" in err


def test_maps_refuses_a_prompt_past_the_context(cli, tmp_path):
    """The bundled model reads 24 tokens: a concept past them has no attention to map, so no map is written."""
    long = ("a big red circle and a small blue star and a green striped heart and a yellow diamond on the left of "
            "a white square")
    code, out, err = cli("maps", long, "--steps", "1", "--out", str(tmp_path / "m"))
    assert code == 2 and err.count("\n") == 1 and "too long" in err and "'white' falls past token 24" in err
    assert not (tmp_path / "m").exists()


def test_sdxl_word_lookup_reads_prompt_2():
    """SDXL's text token i is token i of the prompt (first encoder) beside token i of prompt_2 (second): a word only
    prompt_2 has is found there, and a word whose token meets another word of the other prompt is refused."""
    from auditor.engine.trace import trace

    pipe = tp.sdxl()
    with trace(pipe) as tr:
        tp.generate(pipe, "a red star", prompt_2="a red star on a table", steps=1)
    assert tr.token_indices("star") == (3,) and tr.token_indices("table") == (6,)
    m = tr.maps("table", method="all_heads")
    assert m.shape == (64, 64) and np.isfinite(m).all()
    with trace(pipe) as tr:
        tp.generate(pipe, "a red star", prompt_2="a blue circle", steps=1)
    with pytest.raises(AuditorError) as e:
        tr.token_indices("star")
    assert "'circle'" in _one_line(e) and "prompt_2" in str(e.value)
    assert tr.maps([3], method="all_heads").shape == (64, 64)  # token indices: the user asked for that column
    with trace(pipe) as tr:
        tp.generate(pipe, "a red star", steps=1)  # no prompt_2: both encoders read the prompt
    assert tr.token_indices("star") == (3,)
    with pytest.raises(AuditorError, match="does not occur"):
        tr.token_indices("table")


def test_a_folder_of_fp16_variant_files_only_loads_with_variant(tmp_path, cli):
    """SDXL repositories often ship only model.fp16.safetensors files: a plain load names the --variant to pass."""
    import torch

    path = tmp_path / "fp16-only"
    tp.sd15().save_pretrained(path, safe_serialization=True, variant="fp16")
    assert {M.variant_of(p) for p in M.weight_files(path)} == {"fp16"}
    with pytest.raises(AuditorError) as e:
        M.load_model(str(path), device="cpu")
    assert "`variant=fp16`" in _one_line(e)
    with pytest.raises(AuditorError) as e:
        M.load_model(str(path), device="cpu", variant="bf16")
    assert _one_line(e).startswith("variant bf16") and "fp16" in str(e.value)
    lm = M.load_model(str(path), device="cpu", variant="fp16")
    assert lm.variant == "fp16" and lm.to_json()["variant"] == "fp16" and M.fingerprint_of(lm.pipe) == lm.fingerprint
    assert lm.fingerprint == M.fingerprint(path, "fp16") != M.fingerprint(path)  # another model than a plain load
    for name, want in tp.sd15().unet.state_dict().items():
        assert torch.equal(lm.pipe.unet.state_dict()[name], want), name
    code, out, err = cli("maps", "a red cat", "--model", str(path), "--variant", "fp16", "--method", "all_heads",
                         "--steps", "1", "--height", "64", "--width", "96", "--out", str(tmp_path / "maps"), "--json")
    assert code == 0, err
    from PIL import Image

    assert json.loads(out)["model"]["variant"] == "fp16"
    assert Image.open(tmp_path / "maps" / "image.png").size == (96, 64)  # (width, height)
    code, out, err = cli("maps", "a red cat", "--model", str(path), "--variant", "fp16", "--height", "100")
    assert code == 2 and err.count("\n") == 1 and "--height 100" in err and "multiple of 8" in err


def test_audit_height_and_width_give_non_square_images(cli, tmp_path):
    suite = tmp_path / "wide.yaml"
    suite.write_text("name: wide\ndefaults: {steps: 2, seeds: [0], guidance: 5.0, resolution: 64}\n"
                     "prompts:\n  - {id: p1, text: a red star}\n")
    out = tmp_path / "run"
    code, _, err = cli("audit", str(suite), "--out", str(out), "--no-pdf", "--width", "96", "--json")
    assert code == 0, err
    from PIL import Image

    from auditor.store import RunStore

    with RunStore.open(out) as store:
        assert store.manifest["resolution"] == [64, 96]  # the suite's height, the asked width
        image = store.generations()[0]["image"]
    assert Image.open(out / image).size == (96, 64)
    code, _, err = cli("audit", str(suite), "--resume", str(out), "--no-pdf", "--height", "96")
    assert code == 2 and err.count("\n") == 1 and "64x96" in err and "--height 96" in err


@pytest.mark.parametrize("args", [[], ["audit"], ["maps"], ["calibrate"], ["models"]])
def test_help_shows_flags_as_flags_and_names_the_supported_families(cli, args):
    import re

    code, out, err = cli(*args, "--help")
    assert code == 0 and err == ""
    assert "<bool>" not in out
    assert re.search(r"^  --help +Show this message", out, re.M)
    if args:
        assert re.search(r"^  --json +Print JSON\.", out, re.M), out
    text = " ".join(out.split())
    if args in ([], ["audit"]):
        assert "Stable Diffusion 1.x or 2.x" in text and "SDXL" in text, text
    if not args:  # one line per command, none cut off mid-sentence
        commands = out.split("Commands:")[1]
        assert "..." not in commands and "audit" in commands
    if args in (["audit"], ["maps"]):
        assert "--height" in out and "--width" in out and "--variant" in out
