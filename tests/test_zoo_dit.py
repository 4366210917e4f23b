"""shapes-dit, the bundled transformer model: its folder loads with the stock PixArt pipeline, its training path
(a few steps into a temporary folder), resume, its recorded recipe and replay, its card."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from auditor.zoo import MODELS_DIR, arch

DIT = MODELS_DIR / "shapes-dit"


def _pixart(folder):
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe, seed=0, steps=2):
    return pipe("a big red circle and a small blue star", height=64, width=64, num_inference_steps=steps,
                guidance_scale=5.0, generator=torch.Generator().manual_seed(seed), output_type="np",
                **arch.PIXART_CALL).images[0]


def test_bundled_folder_loads_with_the_pixart_pipeline_and_draws_64x64():
    pipe = _pixart(DIT)
    assert type(pipe.transformer).__name__ == "PixArtTransformer2DModel"
    assert pipe.tokenizer.model_max_length == arch.CONTEXT_LENGTH
    a, b = _image(pipe), _image(pipe)
    assert a.shape == (64, 64, 3) and np.array_equal(a, b)
    weights = sum(p.stat().st_size for p in DIT.rglob("*.safetensors"))
    assert weights <= 15e6 and not list(DIT.rglob("*.bin"))
    from safetensors import safe_open

    with safe_open(str(DIT / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F16"}


def test_frozen_parts_are_shapes_v1s():
    from safetensors.torch import load_file

    for part in ("vae", "text_encoder"):
        (mine,) = sorted((DIT / part).glob("*.safetensors"))
        (v1s,) = sorted((MODELS_DIR / "shapes-v1" / part).glob("*.safetensors"))
        a, b = load_file(mine), load_file(v1s)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_the_bundled_name_resolves():
    from auditor.engine.models import resolve

    assert resolve("shapes-dit") == (DIT, "bundled")


def test_a_few_training_steps_export_a_loadable_folder_and_resume(tmp_path):
    """The training path end to end in seconds: train 2 steps, export, load with the PixArt pipeline; a second
    invocation with more steps resumes from the checkpoint and records the recipe with the frozen parts' source."""
    import os
    import subprocess
    import sys

    def train(steps):
        cmd = [sys.executable, "-m", "auditor.zoo.train", "--version", "dit", "--threads", "1", "--steps", str(steps),
               "--batch", "4", "--pairs", "0.5", "--object-weight", "4", "--work", str(tmp_path / "w"),
               "--export-to", str(tmp_path / "out")]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)

    done = train(2)
    assert done.returncode == 0, done.stderr[-2000:]
    pipe = _pixart(tmp_path / "out")
    assert _image(pipe).shape == (64, 64, 3)
    card = json.loads((tmp_path / "out" / "training.json").read_text())
    assert "--version dit" in card["command"] and "--vae-from shapes-v1 --text-from shapes-v1" in card["command"]
    assert card["transformer"] == json.loads(json.dumps(arch.DIT_CONFIG))
    again = train(3)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from step 2" in (tmp_path / "w" / "train.log").read_text()


def test_fit_resumes_to_the_same_weights(tmp_path):
    """A run killed after its last checkpoint and started again ends where an uninterrupted one does."""
    from auditor.zoo.train import fit

    def run(work, stop):
        torch.manual_seed(0)
        m = torch.nn.Linear(3, 2)
        data = torch.randn(5, 8, 3, generator=torch.Generator().manual_seed(1))

        def loss_at(step):
            if step == stop:
                raise KeyboardInterrupt  # "killed" right after the checkpoint of step stop
            return m(data[step]).pow(2).mean()

        try:
            fit(work, {"m": m}, 5, 1e-2, work / "log", loss_at, every=2)
        except KeyboardInterrupt:
            return None
        return m.state_dict()

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = run(tmp_path / "a", None)
    assert run(tmp_path / "b", 3) is None  # killed in step 3: the last checkpoint is after step 1
    resumed = run(tmp_path / "b", None)
    assert "resumed from step 2" in (tmp_path / "b" / "log").read_text()
    assert all(torch.allclose(whole[k], resumed[k]) for k in whole)


def test_dit_recipe_parses_back_and_replays_with_the_frozen_parts(tmp_path):
    from auditor.zoo.recipe import NOT_RECIPE, parser, recipe_command
    from auditor.zoo.replay import lineage, stage_args

    ap = parser()
    args = ap.parse_args(["--version", "dit", "--steps", "100", "--pairs", "0.4", "--object-weight", "4",
                          "--threads", "1"])
    cmd = recipe_command(ap, args, steps=100, lr=1e-3, batch=32, seed=0, vae_from="shapes-v1", text_from="shapes-v1")
    back = vars(ap.parse_args(cmd.split()[3:]))
    assert back["version"] == "dit" and back["text_from"] == "shapes-v1" and back["pairs"] == 0.4
    assert {k for k in back if back[k] != vars(args)[k]} - set(NOT_RECIPE) == {"lr", "vae_from", "text_from"}
    runs = lineage(json.loads((DIT / "training.json").read_text()))
    assert runs[0]["init"] is None and all(r["version"] == "dit" for r in runs)
    for i, run in enumerate(runs):
        stage = ap.parse_args(stage_args(run["command"], tmp_path, i, 1))
        assert (stage.steps, stage.seed, stage.lr) == (run["steps"], run["seed"], run["lr"])
        assert stage.export_to == str(tmp_path / f"stage{i}") and stage.work == str(tmp_path / f"work{i}")
        if i == 0:  # the base run reads shapes-v1's frozen parts (the VAE's by the dit default), trains the rest
            assert stage.init is None and stage.text_from == "shapes-v1" and stage.vae_from is None
        else:  # a fine-tune starts from the previous stage's export, never from the bundled model
            assert stage.init == str(tmp_path / f"stage{i - 1}")

def test_card_names_the_pipeline_its_heads_and_how_to_call_it():
    from diffusers import PixArtTransformer2DModel

    from auditor.zoo.card import card_for, readme

    card = card_for(DIT, None)
    net = PixArtTransformer2DModel.from_pretrained(DIT / "transformer")
    heads = sum(m.heads for n, m in net.named_modules() if n.endswith("attn2"))
    assert card["architecture"]["pipeline"] == "PixArtAlphaPipeline"
    assert card["architecture"]["cross_attention"].startswith(f"{net.config.num_layers} layers x ")
    assert f"= {heads} heads" in card["architecture"]["cross_attention"]
    text = readme(card)
    assert "PixArtAlphaPipeline.from_pretrained" in text
    assert "use_resolution_binning=False, clean_caption=False, max_sequence_length=24" in text
