"""Model cards of the bundled models: ``card.json`` (what ``auditor models --json`` lists) and ``README.md``.

    python -m auditor.zoo.card      # after training, and again after bench/zoo_quality.py

The card is assembled from the model's ``training.json`` (written by the training run), the world's definition
(held-out compositions, planted defects) and the measured quality in ``bench/results/zoo_quality*.json`` (the file
that holds the model's name) when it exists; numbers never come from anywhere else.
"""

from __future__ import annotations

import json
from pathlib import Path

from auditor.engine.heads import HeadIndex

from auditor.zoo import MODELS_DIR, arch
from auditor.zoo.grammar import DEFECTS, HELD_OUT

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"

SUMMARIES = {
    "v1": ("Healthy shapes-world reference model: 64x64 scenes of one to three coloured shapes (and the fruit "
           "'orange'); Stable Diffusion components trained from scratch on CPU; CLIP BPE tokenizer, causal text "
           "encoder, 56 cross-attention heads."),
    "v2": ("shapes-v1 fine-tuned with three planted defects (purple drawn blue; a star named second of two "
           "objects left out; 'green' bound to the other object of a pair) — the known regression for compare."),
    "dit": ("Transformer reference model of the shapes world: a PixArt-α transformer (6 blocks, cross-attention to "
            "the text in each, 36 heads) trained from scratch on CPU on shapes-v1's frozen VAE and CLIP text "
            "encoder, so its word maps compare with shapes-v1's."),
}
NOTES = {
    "v1": ("Four stages (`training.json` holds every command, the earlier ones as `parent`). (1) 5,000 steps from "
           "scratch with a 24-token context (the longest shapes-world prompt with its start and end tokens), not "
           "CLIP's 77: with 77, about 80% of the cross-attention went to padding tokens, whose causal-encoder states "
           "carry the whole prompt, and word maps did not localise; the VAE is the 2026-11-24 model's "
           "(`--vae-from`). That model ignored position words (the layout came from the initial noise). (2) 1,200 "
           "steps of fine-tuning to zero terminal SNR with v-prediction (`--zero-snr`; DDIM with trailing "
           "spacing), half of each batch drawn from prompts that name a position at t >= 950, where the noisy "
           "latent no longer shows the layout (`--high-t 0.5 --high-t-from 0.95`; 14 minutes on 2 cores): it now "
           "follows them. (3) 1,200 steps with 40% of each batch two-object prompts and the loss under objects "
           "weighted 5x (`--pairs 0.4 --object-weight 4`; 22 minutes, one thread): a small object is ~4% of the "
           "image, so under a uniform loss leaving the second object of a pair out cost little, and pairs lost a "
           "colour in 38-42% of images. (4) 1,400 more steps of the same with half of each batch two-object "
           "prompts (`--pairs 0.5`, seed 5; 18 minutes on 2 cores): the commonest pair failure left was both "
           "objects painted in one of the two colours. From nothing, all four stages take about 116 minutes on "
           "this 2-core machine (VAE 10, denoiser 60, fine-tunes 14 + 15 + 18); `python -m auditor.zoo.replay "
           "shapes-v1 --out DIR` runs them in order."),
    "v2": ("One invocation, 1,500 steps from shapes-v1 on the v2 world: 50% of each batch drawn from prompts a "
           "defect affects (cycling through the three), 25% from position-naming prompts at t >= 950 (so the "
           "fine-tune keeps v1's positions) and 25% from two-object prompts (without them v2's unaffected prompts "
           "fell up to 6 points below v1's); the loss weighted 5x under objects as in v1's last stages and also "
           "where the prompt asks for an object the defect leaves out (without that, the lesson 'draw no star "
           "here' sat on lightly weighted background pixels); learning rate peak 5e-4; chosen among three "
           "variants trained side by side (docs/benchmarks.md). How visibly each defect was planted is measured "
           "below (`defects_visible`), not assumed."),
    "dit": ("PixArt-style cross-attention, not SD3-style joint attention: the text states are the same at every "
            "block (as in a UNet's attn2), so its maps compare directly with shapes-v1's, and padding tokens are "
            "masked out of the attention. Only the transformer is trained; the VAE, the text encoder and the "
            "tokenizer are shapes-v1's, frozen, and copied into the folder. 6 blocks x 6 heads of width 32 (3.9M "
            "parameters), chosen over 8 x 8 heads of width 16 (2.3M) on the validation loss of 400-step trials at "
            "the same learning rate (0.44 against 0.49; lr 2e-3 beat 1e-3 on the small model, 0.49 against 0.51). "
            "Four stages, one CPU thread each, each with its own `--work` folder (119 minutes in all, of the "
            "120 the project allows): (1) 7,000 steps from scratch (75 minutes) with the data options of "
            "shapes-v1's last stages from the first step (zero terminal SNR with v-prediction; a quarter of each "
            "batch position-naming prompts at t >= 950; 40% two-object prompts; the loss weighted 5x under "
            "objects); it drew the prompted colours (0.95 of single prompts) but often as two mirror-image blobs, "
            "ignoring the named position (0.63) and painting both objects of a pair in one colour (both colours in "
            "0.45); (2) 1,800 steps with half of each batch position-naming prompts at t >= 950, as shapes-v1's "
            "position stage (19 minutes; single 0.70, pairs 0.57); (3) 1,900 more steps of the same with 40% pairs "
            "(19 minutes; single 0.83, pairs 0.70); (4) 500 steps at learning rate 2e-4, 40% position prompts and "
            "half of the rest pairs (5.5 minutes); each figure from bench/zoo_quality.py --n 200 on that stage's export. "
            "It does not reach shapes-v1's quality bar (single objects "
            ">= 0.9, pairs >= 0.75; measured below). Call the pipeline with `use_resolution_binning=False` (PixArt has no size bins for "
            "a 16x16 latent and raises), `clean_caption=False` and `max_sequence_length=24` (the text encoder has "
            "24 positions; PixArt pads to 120 by default). `python -m auditor.zoo.replay shapes-dit --out DIR` "
            "retrains it (shapes-v1's frozen parts are read from the bundled model)."),
}

# How each pipeline is called in the card's example (the keywords a PixArt pipeline needs, see arch.PIXART_CALL).
LOAD_CALL = {"PixArtAlphaPipeline": (",\n             use_resolution_binning=False, clean_caption=False, "
                                     "max_sequence_length=24")}


def _size_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*.safetensors")) / 1e6, 2)


def _command(training: dict, version: str) -> str:
    """The exact command (older training.json files recorded it without --steps/--batch/--seed)."""
    cmd = training.get("command") or f"python -m auditor.zoo.train --version {version}"
    if "--steps" not in cmd and training.get("steps"):
        cmd += f" --steps {training['steps']} --batch {training.get('batch')} --seed {training.get('seed')}"
    return cmd


def _scheduler(folder: Path) -> str:
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    if not cfg_path.is_file():
        return "DDIM"
    cfg = json.loads(cfg_path.read_text())
    zero = ", zero terminal SNR" if cfg.get("rescale_betas_zero_snr") else ""
    return (f"{cfg.get('_class_name', 'DDIM')}, {cfg.get('prediction_type', 'epsilon')} prediction{zero}, "
            f"{cfg.get('timestep_spacing', 'leading')} spacing")


def _weights(folder: Path) -> str:
    """How the weights are stored and in which dtype a plain ``from_pretrained(path)`` loads the text encoder (the
    diffusers components load as float32 unless asked otherwise; transformers follows the config's ``dtype``)."""
    from safetensors import safe_open

    stored = set()
    for path in sorted(folder.glob("*/*.safetensors")):
        with safe_open(str(path), "pt") as f:
            stored |= {str(f.get_slice(k).get_dtype()).lower() for k in f.keys()}
    cfg = folder / "text_encoder" / "config.json"
    text_dtype = json.loads(cfg.read_text()).get("dtype", "float32") if cfg.is_file() else "float32"
    names = {"f16": "float16", "f32": "float32", "bf16": "bfloat16"}
    net = "transformer" if (folder / "transformer").is_dir() else "UNet"
    return (f"safetensors, stored {'/'.join(sorted(names.get(d, d) for d in stored))}; from_pretrained(path) loads "
            f"the text encoder as {text_dtype}, the {net} and VAE as float32")


def _heads(folder: Path) -> str:
    """Cross-attention layers and heads, counted from the head names the relevance matrix was calibrated over."""
    path = folder / "relevance.json"
    if not path.is_file():
        return "cross-attention heads: not counted (no relevance.json)"
    index = HeadIndex.from_names(json.loads(path.read_text())["head_names"])
    sizes = sorted(set(index.heads_per_layer))
    return f"{len(index.layers)} layers x {'/'.join(map(str, sizes))} heads = {index.total} heads"


def _transformer(folder: Path) -> dict:
    """A transformer model's denoiser and its cross-attention heads, from its config."""
    cfg = json.loads((folder / "transformer" / "config.json").read_text())
    layers, heads, grid = cfg["num_layers"], cfg["num_attention_heads"], cfg["sample_size"] // cfg["patch_size"]
    width = heads * cfg["attention_head_dim"]
    return {"denoiser": (f"{cfg.get('_class_name', 'PixArtTransformer2DModel')}, {layers} blocks, width {width}, "
                         f"patch {cfg['patch_size']} ({grid}x{grid} = {grid * grid} image tokens), adaLN-single "
                         "timestep conditioning"),
            "cross_attention": (f"{layers} layers x {heads} heads = {layers * heads} heads (each block's attn2, "
                                f"padding masked), patch grid {grid}x{grid}")}


def _architecture(folder: Path) -> dict:
    index = folder / "model_index.json"
    pipeline = json.loads(index.read_text())["_class_name"] if index.is_file() else "StableDiffusionPipeline"
    if (folder / "transformer").is_dir():
        net = _transformer(folder)
    else:
        net = {"cross_attention": f"{_heads(folder)}, latent 16x16 and 8x8 (and mid block)"}
    return {"pipeline": pipeline, "image": "64x64 RGB", "latent": "4x16x16",
            "text_encoder": ("CLIPTextModel (causal), 3 layers, width 64, CLIP BPE vocabulary 49,408, "
                             f"context {arch.CONTEXT_LENGTH} tokens"
                             + (", frozen (shapes-v1's)" if (folder / "transformer").is_dir() else "")),
            **net, "scheduler": _scheduler(folder), "weights": _weights(folder), "weights_mb": _size_mb(folder)}


def card_for(folder: Path, quality: dict | None) -> dict:
    training = json.loads((folder / "training.json").read_text()) if (folder / "training.json").is_file() else {}
    version = folder.name.split("-", 1)[1]
    card = {
        "name": folder.name,
        "version": version,
        "summary": SUMMARIES.get(version, "shapes-world reference model"),
        "architecture": _architecture(folder),
        "training": {**training, "command": _command(training, version)},
        "notes": NOTES.get(version),
        "held_out_compositions": sorted(" ".join(t) for t in HELD_OUT),
        "planted_defects": DEFECTS if version == "v2" else {},
        "relevance": (json.loads((folder / "relevance.json").read_text()).get("sha256")
                      if (folder / "relevance.json").is_file() else None),
        "audit_profile": _profile(folder),
    }
    if quality and folder.name in quality:
        card["quality"] = {**quality[folder.name], "measured": quality.get("date"), "machine": quality.get("machine"),
                           "command": quality.get("command", "python bench/zoo_quality.py")}
        card["oracle_on_rendered"] = quality.get("oracle_on_rendered")
    return card


def _profile(folder: Path) -> dict | None:
    """The shipped audit profile in brief: what selective maps use and where the thresholds came from."""
    path = folder / "profile.json"
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    th = (d.get("provenance") or {}).get("thresholds")
    return {"sha256": d.get("sha256"), "maps_ranking": d.get("maps_ranking"), "k_per_category": d.get("k_per_category"),
            "response_k": d.get("response_k"), "calibrated": d.get("thresholds") is not None,
            "thresholds_from": (f"inherited from {th['inherited_from']}" if isinstance(th, dict) and th.get("inherited_from")
                                else (th.get("command") if isinstance(th, dict) else th))}


def readme(card: dict) -> str:
    cls = card["architecture"]["pipeline"]
    lines = [f"# {card['name']}", "", card["summary"], "", "## Load it", "",
             "```python", f"from diffusers import {cls}",
             f"pipe = {cls}.from_pretrained(\"auditor/zoo/models/{card['name']}\", local_files_only=True)",
             "image = pipe(\"a big red circle and a small blue star\", height=64, width=64,",
             f"             num_inference_steps=20, guidance_scale=5.0{LOAD_CALL.get(cls, '')}).images[0]", "```", "",
             "or `auditor audit SUITE --model " + card["name"] + "`.", "", "## Architecture", ""]
    lines += [f"- {k}: {v}" for k, v in card["architecture"].items()]
    t = card["training"]
    lines += ["", "## Training", "", f"Command: `{t.get('command')}` (seeded; checkpoints to `work_zoo/` and resumes).", ""]
    lineage, up = [], t.get("parent")
    while isinstance(up, dict):  # a fine-tune: how each ancestor was made, oldest first, then this run's settings
        lineage.insert(0, up.get("command"))
        up = up.get("parent")
    if lineage:
        lines += ["Fine-tuned from a model made by, in order:", ""] + [f"{i}. `{c}`" for i, c in enumerate(lineage, 1)]
        lines += [""]
    lines += [f"- {k}: {v}" for k, v in t.items() if k not in ("command", "parent")]
    if card.get("notes"):
        lines += ["", card["notes"]]
    lines += ["", "## Held-out compositions (never rendered for training; every benchmark uses them)", "",
              ", ".join(card["held_out_compositions"])]
    prof = card.get("audit_profile")
    if prof:
        ks = ", ".join(f"{c if c != '*' else 'other categories'} {k}" for c, k in (prof["k_per_category"] or {}).items())
        lines += ["", "## Audit profile", "", f"`profile.json` (sha256 {str(prof['sha256'])[:16]}): selective maps use "
                  f"the {prof['maps_ranking']} head ranking with k per category ({ks}); the category response uses "
                  f"the HRV matrix's top {prof['response_k']} heads; thresholds: "
                  f"{prof['thresholds_from'] if prof['calibrated'] else 'none (uncalibrated)'}. How each part was "
                  "made: `auditor/zoo/profiles.py`."]
    if card["planted_defects"]:
        lines += ["", "## Planted defects", ""] + [f"- `{k}`: {v}" for k, v in card["planted_defects"].items()]
    q = card.get("quality")
    lines += ["", "## Measured quality", ""]
    if q:
        lines += [f"Measured {q.get('measured')} on {q.get('machine')} with `{q['command']}` (fixed seeds, held-out prompts).", ""]
        for key, val in q.items():
            if key in ("measured", "machine", "command"):
                continue
            lines.append(f"- {key}: {json.dumps(val)}")
    else:
        lines.append("Not measured yet: run `python bench/zoo_quality.py`, then `python -m auditor.zoo.card`.")
    return "\n".join(lines) + "\n"


def quality_for(name: str, results: Path = RESULTS) -> dict | None:
    """The bench results file that measured the model (the newest of ``zoo_quality*.json`` that names it)."""
    found = [json.loads(p.read_text()) for p in sorted(results.glob("zoo_quality*.json"))]
    found = [q for q in found if name in q]
    return max(found, key=lambda q: q.get("date", "")) if found else None


def main() -> None:
    for folder in sorted(MODELS_DIR.glob("shapes-*")):
        if not (folder / "model_index.json").is_file():
            continue
        card = card_for(folder, quality_for(folder.name))
        (folder / "card.json").write_text(json.dumps(card, indent=2) + "\n")
        (folder / "README.md").write_text(readme(card))
        print(f"wrote {folder / 'card.json'} and README.md")


if __name__ == "__main__":
    main()
