"""The bundled reference models as a user meets them: ordinary diffusers loading, determinism, tracing, the shipped
head-relevance matrix, the models listing, and damaged weights."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from auditor.zoo import MODELS_DIR, bundled_models

NAMES = [m.name for m in bundled_models()]
ROOT = Path(__file__).resolve().parents[1]


# each bundled pipeline class and the cross-attention heads its denoiser has
HEADS = {"StableDiffusionPipeline": 56, "PixArtAlphaPipeline": 36}


def _denoiser_folder(name: str) -> tuple[str, str]:
    """(component folder, diffusers class) of a bundled model's denoiser, from its model_index.json."""
    index = json.loads((MODELS_DIR / name / "model_index.json").read_text())
    sub = "unet" if "unet" in index else "transformer"
    return sub, index[sub][1]


@pytest.fixture(scope="module", params=NAMES)
def pipe(request):
    from diffusers import DiffusionPipeline

    p = DiffusionPipeline.from_pretrained(MODELS_DIR / request.param, torch_dtype=torch.float32,
                                          local_files_only=True)
    p.set_progress_bar_config(disable=True)
    p.bundled_name = request.param
    return p


def _gen(pipe, seed, prompt="a big red circle and a small blue star", steps=4):
    from auditor.engine.families import call_kwargs

    g = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, guidance_scale=5.0, height=64, width=64, generator=g,
                output_type="np", **call_kwargs(pipe)).images[0]


def test_shapes_v1_is_bundled_and_small():
    assert "shapes-v1" in NAMES
    for m in bundled_models():
        weights = sum(p.stat().st_size for p in m.path.rglob("*.safetensors"))
        assert weights <= 15e6, (m.name, weights)
        assert not list(m.path.rglob("*.bin")) and not list(m.path.rglob("*.ckpt"))
        assert json.loads((m.path / "model_index.json").read_text())["_class_name"] in HEADS


def test_loads_offline_and_is_deterministic(pipe):
    a, b, c = _gen(pipe, 0), _gen(pipe, 0), _gen(pipe, 1)
    assert a.shape == (64, 64, 3)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)
    ids = pipe.tokenizer("a red star")["input_ids"]  # the real CLIP BPE: start, "a" = 320, "red" = 736, ..., end
    assert ids[:3] == [49406, 320, 736] and ids[-1] == 49407 and len(ids) == 5


def test_every_weight_comes_from_its_file(pipe):
    """Each component holds exactly the tensors of its safetensors file, under the same names: a library version
    that names them otherwise (transformers 4.x wants a `text_model.` prefix) would leave weights randomly
    initialised with only a warning."""
    from safetensors.torch import load_file

    for name in ("text_encoder", _denoiser_folder(pipe.bundled_name)[0], "vae"):
        saved = {}
        for f in sorted((MODELS_DIR / pipe.bundled_name / name).glob("*.safetensors")):
            saved.update(load_file(f))
        loaded = getattr(pipe, name).state_dict()
        assert set(loaded) == set(saved), (name, sorted(set(loaded) ^ set(saved))[:5])
        for key, tensor in saved.items():
            assert loaded[key].dtype == torch.float32, (name, key, loaded[key].dtype)
            assert torch.equal(loaded[key], tensor.float()), (name, key)


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def test_python_blocks_of_the_readme_and_the_cards_run_as_written():
    """The README's API example and each card's "Load it" snippet, verbatim, in a fresh interpreter started in the
    checkout (their paths are relative to it), each block in a namespace of its own."""
    docs = [ROOT / "README.md"] + [MODELS_DIR / name / "README.md" for name in NAMES]
    blocks = [(doc.relative_to(ROOT).as_posix(), block) for doc in docs for block in _python_blocks(doc)]
    assert [d for d, _ in blocks].count("README.md") >= 1 and len(blocks) >= len(docs)
    driver = ("import sys\n"
              "for i, src in enumerate(sys.argv[1:]):\n"
              "    exec(compile(src, f'<block {i}>', 'exec'), {'__name__': '__main__'})\n"
              "    print('ran', i, flush=True)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", driver, *(b for _, b in blocks)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    ran = proc.stdout.split().count("ran")
    assert proc.returncode == 0, f"{blocks[ran][0]}, python block failed:\n{blocks[ran][1]}\n{proc.stderr[-3000:]}"
    assert ran == len(blocks)


def test_context_is_cut_to_the_shapes_prompts(pipe):
    """The pipeline pads to the tokenizer's length, so tokenizer and text encoder must agree on it; every prompt of
    the default suite and of the grammar must fit (else the audit refuses it as too long)."""
    import yaml

    from auditor.resources import find_suite
    from auditor.zoo.grammar import sample_prompts

    n = pipe.tokenizer.model_max_length
    assert n == pipe.text_encoder.config.max_position_embeddings < 77
    suite = yaml.safe_load(find_suite("shapes-default").read_text())
    prompts = [p["text"] for p in suite["prompts"]] + sample_prompts(500, seed=3)
    assert max(len(pipe.tokenizer(p)["input_ids"]) for p in prompts) <= n


def test_trace_leaves_the_image_unchanged_and_sees_every_head(pipe):
    from auditor import trace

    plain = _gen(pipe, 3)
    with trace(pipe) as tr:
        traced = _gen(pipe, 3)
    np.testing.assert_allclose(plain, traced, atol=1e-5)
    assert tr.head_index.total == HEADS[type(pipe).__name__]
    m = tr.maps("star", method="all_heads")
    assert m.shape == (64, 64) and np.isfinite(m).all() and m.max() > 0


def test_shipped_relevance_matches_the_model(pipe):
    from auditor.engine.models import fingerprint
    from auditor.engine.relevance import RelevanceMatrix, check_compatible

    path = MODELS_DIR / pipe.bundled_name / "relevance.npz"
    if not path.is_file():
        pytest.skip(f"{pipe.bundled_name} ships no relevance matrix yet")
    rm = RelevanceMatrix.load(path)
    assert rm.model_fingerprint == fingerprint(path.parent)
    check_compatible(rm, pipe, str(path))
    assert {"colour", "shape", "size", "texture"} <= set(rm.categories)
    for cat in ("colour", "shape"):
        assert len(set(rm.top_heads(cat, 8))) == 8


def test_models_command_lists_cards(cli):
    code, out, err = cli("models", "--json")
    assert code == 0, err
    listed = {m["name"]: m for m in json.loads(out)}
    assert set(listed) == set(NAMES)
    for m in listed.values():
        assert m["path"] and m["version"] and m["summary"]


@pytest.mark.parametrize("name", NAMES)
def test_card_counts_the_heads_the_denoiser_has(name):
    import diffusers

    from auditor.engine.heads import HeadIndex, text_attention_modules
    from auditor.zoo.card import card_for

    sub, cls = _denoiser_folder(name)
    net = getattr(diffusers, cls).from_pretrained(MODELS_DIR / name / sub)
    mods = text_attention_modules(net)
    index = HeadIndex(tuple(n for n, _ in mods), tuple(int(m.heads) for _, m in mods))
    said = card_for(MODELS_DIR / name, None)["architecture"]["cross_attention"]
    assert said.startswith(f"{len(index.layers)} layers x ") and f"= {index.total} heads" in said


@pytest.mark.parametrize("damage", ["truncate", "remove"])
def test_damaged_weights_give_one_line(cli, tmp_path, damage):
    copy = tmp_path / "model"
    shutil.copytree(MODELS_DIR / "shapes-v1", copy)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        weights.unlink()
    code, out, err = cli("maps", "a red star", "--model", str(copy), "--out", str(tmp_path / "maps"), "--steps", "2")
    assert code == 2, err
    lines = [x for x in err.strip().splitlines() if x.startswith("auditor:")]
    # (a "--- Logging error ---" block is pytest's captured stream closing under a library logger, not our output)
    assert len(lines) == 1 and ("Traceback" not in err or "--- Logging error ---" in err)
    assert "unet" in lines[0]


def test_training_records_a_command_that_parses_back_to_the_same_recipe():
    from auditor.zoo.recipe import NOT_RECIPE, parser, recipe_command

    ap = parser()
    args = ap.parse_args(["--version", "v1", "--from", "shapes-v1", "--zero-snr", "--high-t", "0.5",
                          "--high-t-from", "0.95", "--lr", "5e-4", "--seed", "3", "--threads", "1"])
    cmd = recipe_command(ap, args, steps=1200, lr=5e-4, batch=args.batch, seed=args.seed)
    assert cmd.startswith("python -m auditor.zoo.train --version v1") and "--threads" not in cmd
    back = vars(ap.parse_args(cmd.split()[3:]))
    want = {**vars(args), "steps": 1200}
    assert {k: v for k, v in back.items() if k not in NOT_RECIPE} == {k: v for k, v in want.items() if k not in NOT_RECIPE}


def test_training_weighs_where_a_planted_defect_left_an_object_out():
    """v2's lesson "draw no star here" sits on background pixels: the batch marks them so the loss can weigh them."""
    from auditor.zoo.train import batch

    b = batch(seed=0, step=3, n=24, defects=True, focus=1.0)
    assert b.left_out.shape == (24, 1, 64, 64)
    for i, p in enumerate(b.prompts):
        star_second = " and " in p and p.rstrip().split(" and ")[-1].split(" on a ")[0].endswith("star")
        if b.left_out[i].any():
            # the region is background in the target image (nothing was drawn there) and lies where a star would go
            img = b.images[i]
            under = b.left_out[i, 0].bool()
            assert (img[:, under] - img[:, :1, :1].reshape(3, 1)).abs().amax() < 1e-6 or not star_second
        elif star_second:
            raise AssertionError(f"{p!r}: the neglected star has no left-out region")
    assert b.left_out.flatten(1).any(1).sum() >= 3  # focus cycles through the defects: stars are in the batch


def test_training_batches_hold_the_requested_shares_of_position_and_pair_prompts():
    from auditor.zoo.train import batch

    x, prompts, left_out = batch(seed=0, step=7, n=10, positioned=3, pairs=4)
    again = batch(seed=0, step=7, n=10, positioned=3, pairs=4).prompts
    assert not left_out.any()  # the v1 world leaves nothing out
    assert x.shape == (10, 3, 64, 64) and prompts == again  # seeded per step: a resumed run sees the same data
    position_words = ("on the left", "on the right", "at the top", "at the bottom", "in the center", "left of",
                      "right of", "above", "below")
    assert all(any(w in p for w in position_words) for p in prompts[:3])
    # two-object prompts: joined by "and" or a relation, never a list (triples) or a count word
    assert all((" and " in p or any(w in p for w in position_words + ("next to",))) and "," not in p
               and not p.startswith(("two", "three")) for p in prompts[3:7])


@pytest.mark.parametrize("name", ["shapes-v1", "shapes-v2"])
def test_replay_chains_every_recorded_stage_from_nothing(name, tmp_path):
    from auditor.zoo.replay import lineage, stage_args
    from auditor.zoo.recipe import parser

    runs = lineage(json.loads((MODELS_DIR / name / "training.json").read_text()))
    assert runs[0].get("parent") is None and runs[0]["init"] is None  # the base run trains from nothing
    stages = [parser().parse_args(stage_args(r["command"], tmp_path, i, 1)) for i, r in enumerate(runs)]
    assert stages[0].vae_from is None and stages[0].init is None  # the VAE is trained too, not reused
    for i, (run, args) in enumerate(zip(runs, stages)):
        assert args.export_to == str(tmp_path / f"stage{i}") and args.work == str(tmp_path / f"work{i}")
        assert (args.steps, args.seed, args.version) == (run["steps"], run["seed"], run["version"])
        assert args.lr == run["lr"] or (i == 0 and args.lr is None)  # the oldest record leaves the default lr out
        if i:
            assert args.init == str(tmp_path / f"stage{i - 1}")  # never the bundled model
    assert len(stages) == (4 if name == "shapes-v1" else 5)


def test_replay_of_an_unknown_model_is_one_line(capsys):
    from auditor.zoo.replay import main

    assert main(["shapes-v9", "--out", "unused", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "shapes-v9" in err
