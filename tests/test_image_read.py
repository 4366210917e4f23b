"""trace_image: maps read from a given image (no generation), checked against a reference reading and against the
maps captured while the same image was generated; `auditor maps --image` and `auditor audit --images`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_pipelines as tp
from auditor import trace, trace_image
from auditor.errors import AuditorError


@pytest.fixture(scope="module")
def v1():
    from auditor.engine.models import load_model

    pipe = load_model("shapes-v1", "cpu", "float32").pipe
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def generated(v1):
    """One shapes-v1 image generated under trace, with its trace."""
    g = torch.Generator("cpu").manual_seed(5)
    with trace(v1) as tr:
        image = v1("a red circle and a blue square", num_inference_steps=12, guidance_scale=5.0,
                   generator=g).images[0]
    return image, tr


def test_reading_equals_reference_computation():
    """The buffers equal a reading done by hand with diffusers' own parts: the VAE posterior's mode, DDPM's
    add_noise on the same noise, and one conditional UNet pass per timestep under the ordinary trace."""
    from diffusers import DDPMScheduler
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

    pipe = tp.sd15()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    ts = (100, 600)
    got = trace_image(pipe, image, "a red cat", timesteps=ts, seed=7)
    x = pipe.image_processor.preprocess(image, height=64, width=64)
    latent = retrieve_latents(pipe.vae.encode(x), sample_mode="argmax") * pipe.vae.config.scaling_factor
    noising = DDPMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator("cpu").manual_seed(7)
    fresh = tp._build_sd("sd15", 0)  # never called: no step total or guidance left on it
    with torch.no_grad(), trace(fresh) as want:
        states = fresh.encode_prompt("a red cat", "cpu", 1, False)[0]
        for t in ts:
            noisy = noising.add_noise(latent, torch.randn(latent.shape, generator=g), torch.tensor([t]))
            fresh.unet(noisy, t, encoder_hidden_states=states)
    assert got.steps_counted == want.steps_counted == 2
    assert got.buffers.keys() == want.buffers.keys()
    for name in got.buffers:
        torch.testing.assert_close(got.buffers[name], want.buffers[name], rtol=1e-4, atol=1e-6)


def test_maps_agree_with_generation_time_maps(v1, generated):
    """Read back with its prompt, an image's noun and colour maps look like those captured while it was drawn."""
    image, tr = generated
    read = trace_image(v1, image, "a red circle and a blue square")
    for word in ("circle", "square", "red", "blue"):
        a, b = tr.maps(word, method="all_heads"), read.maps(word, method="all_heads")
        assert a.shape == b.shape == (image.height, image.width)
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.8, word
    # and the map of "circle" is not the map of "square": the reading follows the words
    c, s = read.maps("circle", method="all_heads"), read.maps("square", method="all_heads")
    assert np.corrcoef(c.ravel(), s.ravel())[0, 1] < 0.5


def test_reading_ignores_what_the_last_generation_left_on_the_pipeline(v1, generated):
    """After a guided 12-step call, the pipeline still says 12 steps and guidance on: a reading counts its own
    passes (3 timesteps x 2 draws), all of them conditional."""
    image, _ = generated
    assert v1._num_timesteps == 12 and v1.do_classifier_free_guidance
    read = trace_image(v1, image, "a red circle", draws=2, seed=1)
    again = trace_image(v1, image, "a red circle", draws=2, seed=1)
    other = trace_image(v1, image, "a red circle", draws=2, seed=2)
    assert read.steps_counted == 6 and read.n_items == 1
    assert read.reading.to_json() == {"mode": "given-image", "timesteps": [300, 500, 699], "noise_seed": 1,
                                      "draws": 2, "read_size": [64, 64], "given_size": [64, 64]}
    name = read.layers[0]
    assert torch.equal(read.buffers[name], again.buffers[name])
    assert not torch.equal(read.buffers[name], other.buffers[name])


def test_any_shape_is_read_at_the_models_grid_and_mapped_back(v1, generated):
    image, _ = generated
    wide = image.resize((160, 96))
    read = trace_image(v1, wide, "a red circle and a blue square")
    assert read.reading.given_size == (96, 160)
    h, w = read.reading.read_size
    assert h % 8 == 0 and w % 8 == 0 and w > h and h <= 96 and w <= 160
    assert read.maps("circle", method="all_heads").shape == (96, 160)


def test_sdxl_reads_an_image():
    pipe = tp.sdxl()
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    read = trace_image(pipe, image, "a red cat", timesteps=(500,))
    assert read.steps_counted == 1
    assert read.maps("cat", method="all_heads").shape == (64, 64)


@pytest.mark.parametrize("kwargs, message", [
    ({"image": Image.new("RGB", (32, 32))}, "smaller than"),
    ({"image": Image.new("RGB", (0, 0))}, "empty"),
    ({"timesteps": (1000,)}, "0..999"),
    ({"timesteps": ()}, "at least one timestep"),
    ({"draws": 0}, "draws"),
    ({"size": (60, 64)}, "multiples of"),
])
def test_bad_readings_are_refused(v1, kwargs, message):
    args = {"image": Image.new("RGB", (64, 64)), **kwargs}
    with pytest.raises(AuditorError, match=message):
        trace_image(v1, args.pop("image"), "a red circle", **args)


def test_unreadable_image_file(v1, tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(AuditorError, match="not a readable image"):
        trace_image(v1, bad, "a red circle")
    with pytest.raises(AuditorError, match="no such image"):
        trace_image(v1, tmp_path / "missing.png", "a red circle")


# --- the command line --------------------------------------------------------------------------------------------

SUITE = """\
name: given
defaults: {steps: 6, seeds: [0], guidance: 5.0, resolution: 64}
prompts:
  - {id: p1, text: a red star}
  - {id: p2, text: a blue circle and a green heart}
"""


@pytest.fixture(scope="module")
def made_run(tmp_path_factory):
    """A generated run of a two-prompt suite (the images to read back)."""
    from auditor.cli import main

    root = tmp_path_factory.mktemp("given")
    suite = root / "given.yaml"
    suite.write_text(SUITE)
    assert main(["audit", str(suite), "--out", str(root / "made"), "--no-pdf", "--seeds", "0,3"]) == 0
    return suite, root / "made"


def test_maps_command_reads_a_given_image(cli, made_run, tmp_path):
    _, made = made_run
    code, out, err = cli("maps", "--image", str(made / "images" / "p2__s3.png"), "--prompt",
                         "a blue circle and a green heart", "--out", str(tmp_path / "m"), "--json")
    assert code == 0, err
    rec = json.loads(out)
    assert rec["reading"]["mode"] == "given-image" and "steps" not in rec
    assert [c["text"] for c in rec["concepts"]] == ["blue", "circle", "green", "heart"]
    assert all(Path(c["overlay"]).is_file() for c in rec["concepts"])


def test_audit_of_a_run_folders_images(cli, made_run, tmp_path):
    suite, made = made_run
    run = tmp_path / "read"
    code, out, err = cli("audit", str(suite), "--images", str(made), "--out", str(run), "--no-pdf", "--json")
    assert code == 0, err
    res = json.loads((run / "results.json").read_text())
    made_res = json.loads((made / "results.json").read_text())
    key = lambda g: (g["prompt_id"], g["seed"])  # noqa: E731
    assert sorted(map(key, res["generations"])) == sorted(map(key, made_res["generations"]))
    from auditor.store import RunStore

    with RunStore.open(run) as store:
        given = store.manifest["given_images"]
    assert given["timesteps"] == [300, 500, 699] and len(given["images"]) == 4
    # the images stored are the ones given, byte for byte as pixels
    for g in res["generations"]:
        a = np.asarray(Image.open(run / "images" / f"{g['prompt_id']}__s{g['seed']}.png"))
        b = np.asarray(Image.open(made / "images" / f"{g['prompt_id']}__s{g['seed']}.png"))
        assert np.array_equal(a, b)
    assert "Read from given images" in (run / "report.html").read_text()


def test_audit_of_a_manifest(cli, made_run, tmp_path):
    suite, made = made_run
    lines = [{"image": str(made / "images" / "p1__s0.png"), "prompt_id": "p1", "seed": 0},
             {"image": str(made / "images" / "p2__s3.png"), "prompt": "a blue circle and a green heart", "seed": 3},
             {"image": str(made / "images" / "p2__s0.png"), "prompt": "a green heart"}]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    code, _, err = cli("audit", str(suite), "--images", str(manifest), "--out", str(tmp_path / "r"), "--no-pdf")
    assert code == 0, err
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    got = {(g["prompt_id"], g["seed"]): g["prompt"] for g in res["generations"]}
    # a prompt of the suite keeps its id; one outside it is audited under the image's name
    assert got == {("p1", 0): "a red star", ("p2", 3): "a blue circle and a green heart",
                   ("p2__s0", 0): "a green heart"}


@pytest.mark.parametrize("setup, message", [
    (lambda d, m: (d / "manifest.jsonl").write_text('{"image": "a.png"}\n'), "has no prompt"),
    (lambda d, m: (d / "manifest.jsonl").write_text('{"image": "a.png", "prompt_id": "nope"}\n'), "not in the suite"),
    (lambda d, m: (d / "manifest.jsonl").write_text("{oops\n"), "not a JSON object"),
    (lambda d, m: None, "no images in the folder"),
    (lambda d, m: Image.new("RGB", (16, 16)).save(d / "p1.png"), "smaller than"),
    (lambda d, m: (d / "p1.png").write_bytes(b"junk"), "not a readable image"),
])
def test_bad_given_images_are_one_line_and_write_nothing(cli, made_run, tmp_path, setup, message):
    suite, made = made_run
    src = tmp_path / "src"
    src.mkdir()
    setup(src, made)
    code, out, err = cli("audit", str(suite), "--images", str(src), "--out", str(tmp_path / "r"), "--no-pdf")
    assert code == 2
    assert err.startswith("auditor: error:") and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_generation_options_with_images_are_refused(cli, made_run, tmp_path):
    suite, made = made_run
    code, _, err = cli("audit", str(suite), "--images", str(made), "--seeds", "0", "--out", str(tmp_path / "r"))
    assert code == 2 and "--seeds" in err
    code, _, err = cli("audit", str(suite), "--timesteps", "10,20", "--out", str(tmp_path / "r"))
    assert code == 2 and "--images" in err


def test_compare_says_when_one_run_read_given_images(cli, made_run, tmp_path):
    suite, made = made_run
    run = tmp_path / "read"
    assert cli("audit", str(suite), "--images", str(made / "images"), "--out", str(run), "--no-pdf")[0] == 0
    code, out, err = cli("compare", str(made), str(run), "--out", str(tmp_path / "cmp"), "--no-pdf")
    assert code == 0, err
    assert "run B's maps were read from given images" in err
    assert "read from given images" in (tmp_path / "cmp" / "compare.html").read_text()


def test_resume_of_a_given_images_run_reads_the_same_images_the_same_way(cli, made_run, tmp_path):
    suite, made = made_run
    run = tmp_path / "read"
    lines = [{"image": str(made / "images" / "p1__s0.png"), "prompt_id": "p1"}]
    manifest = tmp_path / "one.jsonl"
    manifest.write_text(json.dumps(lines[0]) + "\n")
    assert cli("audit", str(suite), "--images", str(manifest), "--out", str(run), "--no-pdf")[0] == 0
    code, out, err = cli("audit", str(suite), "--resume", str(run), "--no-pdf", "--json")
    assert code == 0, err
    assert json.loads(out)["generated"] == 0 and json.loads(out)["resumed_skipped"] == 1
    code, _, err = cli("audit", str(suite), "--resume", str(run), "--timesteps", "100", "--no-pdf")
    assert code == 2 and "reads them the same way" in err
    # another image under the same manifest name is not the run's image
    Image.open(made / "images" / "p2__s0.png").save(tmp_path / "swapped.png")
    manifest.write_text(json.dumps({**lines[0], "image": str(tmp_path / "swapped.png")}) + "\n")
    code, _, err = cli("audit", str(suite), "--resume", str(run), "--no-pdf")
    assert code == 2 and "not the ones the run started with" in err


@pytest.mark.parametrize("family", ["pixart", "sd3", "sd35", "flux"])
def test_transformer_families_read_an_image(family):
    """Each transformer family reads a given image: one recorded pass per (timestep, draw), maps at the image's
    size, the same noise seed the same reading."""
    import tiny_dit as td

    pipe = td.shared(family)
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    kw = {"size": (64, 64), "timesteps": (300, 700), "draws": 2, "text_kwargs": {"max_sequence_length": 24}}
    read = trace_image(pipe, image, "a red cat next to a blue car", seed=3, **kw)
    again = trace_image(pipe, image, "a red cat next to a blue car", seed=3, **kw)
    assert read.steps_counted == 4
    assert read.maps("cat", method="all_heads").shape == (64, 64)
    name = read.layers[0]
    assert torch.equal(read.buffers[name], again.buffers[name])


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_one_side_given_alone_keeps_the_models_own_other_side(family):
    """`--height` alone on a transformer model: the width is the model's default size (its pipeline's)."""
    import tiny_dit as td

    from auditor.run_checks import image_size

    pipe = td.shared(family)
    native = pipe.default_sample_size * pipe.vae_scale_factor
    assert image_size(64, None, None, pipe) == (64, native)
    assert image_size(None, 128, None, tp.sd15()) == (64, 128)  # the UNet's own 64 px
