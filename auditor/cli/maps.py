"""`auditor maps` (one prompt's maps, generated or read from an image) and `auditor calibrate` (a model's audit profile)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Optional

import typer
from auditor.cli.app import _MODEL_HELP, _VARIANT_HELP, _int_list, _print_json, app
from auditor.errors import AuditorError

DEFAULT_GUIDANCE = 7.5  # for a model whose source names none (a folder's or a file's)


def _guidance_for(lm, given: float | None) -> float:
    """The guidance to generate with: ``--guidance`` when given; else a bundled model's own (the guidance its
    world's suites and shipped profile use), else ``DEFAULT_GUIDANCE``."""
    if given is not None:
        return given
    if lm.source == "bundled":
        from auditor.registry import bundled_source

        own = bundled_source().guidance
        if own is not None:
            return own
    return DEFAULT_GUIDANCE


@app.command("maps", short_help="Write each concept's attention map over a generated or given image.")
def maps_cmd(
    prompt_arg: Optional[str] = typer.Argument(None, metavar="[PROMPT]", help="The prompt to generate and map."),
    prompt_opt: Optional[str] = typer.Option(None, "--prompt", help="The prompt (the same as PROMPT; with --image, the text to read the image with)."),
    image: Optional[str] = typer.Option(None, "--image", help="Read the maps from this image instead of generating one (no generation: the model's VAE encodes it, the denoiser reads it at a few noise levels)."),
    timesteps: Optional[str] = typer.Option(None, "--timesteps", help="With --image: comma list of training-schedule timesteps to read at (default: 30%, 50% and 70% of the schedule)."),
    draws: int = typer.Option(1, "--draws", help="With --image: noised copies per timestep."),
    concept: Optional[list[str]] = typer.Option(None, "--concept", help="A word to map (repeatable); default: the prompt's lexicon concepts."),
    method: str = typer.Option("selective", "--method", help="selective | all_heads | bottom_k | weighted | all"),
    k: Optional[int] = typer.Option(None, "--k", help="Heads per concept for selective / bottom_k (default: the profile's k of its category)."),
    model: str = typer.Option("shapes-v1", "--model", help=_MODEL_HELP),
    seed: int = typer.Option(0, "--seed", help="Seeds the generation, or with --image the noise."),
    steps: int = typer.Option(20, "--steps", help="Denoising steps."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale; default 7.5 (a bundled model: the guidance its world's suites use)."),
    out: str = typer.Option("reports/maps", "--out", help="Folder for image.png and the overlays."),
    relevance: Optional[str] = typer.Option(None, "--relevance", help="A relevance matrix (.npz) to use instead of the profile's."),
    profile: Optional[str] = typer.Option(None, "--profile", help="An audit profile (profile.json) instead of the model's own."),
    height: Optional[int] = typer.Option(None, "--height", help="Image height in pixels, a multiple of 8 (default: the model's)."),
    width: Optional[int] = typer.Option(None, "--width", help="Image width in pixels, a multiple of 8 (default: the model's)."),
    device: str = typer.Option("auto", "--device", help="cpu | cuda | mps | auto"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | float16 | bfloat16"),
    variant: Optional[str] = typer.Option(None, "--variant", help=_VARIANT_HELP),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle weights (.bin/.ckpt): they can run code."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Generate one image and write each concept's attention map over it (methods side by side with --method all);
    with --image, read the maps from that image and the prompt instead, without generating."""
    from auditor.engine.maps import METHODS
    from auditor.prompt_maps import image_prompt_maps, prompt_maps, save_prompt_maps
    from auditor.engine.models import load_model
    from auditor.profile import profile_for
    from auditor.run_checks import check_generation_values, check_image_size, check_steps

    if prompt_arg is not None and prompt_opt is not None and prompt_arg != prompt_opt:
        raise AuditorError("give the prompt once: as PROMPT or as --prompt")
    prompt = prompt_arg if prompt_arg is not None else prompt_opt
    if prompt is None:
        raise AuditorError("a prompt is needed: PROMPT or --prompt TEXT")
    if image is None and (timesteps is not None or draws != 1):
        raise AuditorError("--timesteps and --draws read a given image: add --image FILE")
    if image is not None and (height or width):
        raise AuditorError("--height/--width size a generated image; a given image is read at its own shape")
    if method != "all" and method not in METHODS:
        raise AuditorError(f"--method {method}: expected one of {', '.join(METHODS)}, all")
    methods = list(METHODS) if method == "all" else [method]
    check_image_size(height, width)
    check_generation_values(steps, seed, guidance, k)
    if image is not None and not Path(image).is_file():
        raise AuditorError(f"--image {image}: no such file")
    ts = _int_list(timesteps, "--timesteps")
    lm = load_model(model, device, dtype, allow_pickle, variant)
    check_steps(steps, lm.pipe)
    ranking = None if methods == ["all_heads"] else profile_for(lm, profile, relevance).maps_source
    if image is not None:
        result = image_prompt_maps(lm.pipe, image, prompt, concept, methods, k, seed, ts, draws, ranking)
    else:
        result = prompt_maps(lm.pipe, prompt, concept, methods, k, seed, steps, _guidance_for(lm, guidance), ranking,
                             height, width)
    record = {"model": lm.to_json(), **save_prompt_maps(result, out)}
    if as_json:
        _print_json(record)
        return
    if image is not None:
        typer.echo(f"read from {image} (no generation), timesteps {record['reading']['timesteps']}")
    typer.echo(f"image: {record['image']}")
    for c in record["concepts"]:
        typer.echo(f"{c['text']:16s} {c['category'] or '-':12s} ({c['category_source']}) tokens "
                   f"{','.join(map(str, c['token_indices']))} -> {c['overlay']}")


@app.command("calibrate", short_help="Calibrate the model's audit profile: head rankings, k, thresholds.")
def calibrate_cmd(
    model: str = typer.Option("shapes-v1", "--model", help=_MODEL_HELP),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="Calibration prompts: a .txt (one a line) or a suite (.yaml or shipped name); default: general prompts (a bundled model: its world's)."),
    budget: int = typer.Option(512, "--budget", help="At most this many prompts per head ranking; each stops earlier once its top heads agree between n/2 and n."),
    threshold_prompts: int = typer.Option(200, "--threshold-prompts", help="Images generated to set the diagnostic thresholds on (0: an uncalibrated profile, no flags)."),
    flag_budget: float = typer.Option(0.05, "--flag-budget", help="The largest share of the presumed-healthy concepts of the threshold prompts' generations the thresholds may flag (a first pass at this budget presumes the generations it flags failures; default: the false-flag target of the bundled models' oracle tuning)."),
    max_flag_rate: float = typer.Option(0.5, "--max-flag-rate", help="A concept fails its prompt when flagged in more than this share of its seeds."),
    steps: int = typer.Option(20, "--steps", help="Denoising steps per prompt."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale of the calibration images; default 7.5 (a bundled model: the guidance its world's suites and shipped profile use)."),
    seed: int = typer.Option(0, "--seed"),
    out: Optional[str] = typer.Option(None, "--out", help="Also save the profile here (a .json file)."),
    device: str = typer.Option("auto", "--device", help="cpu | cuda | mps | auto"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | float16 | bfloat16"),
    variant: Optional[str] = typer.Option(None, "--variant", help=_VARIANT_HELP),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle weights (.bin/.ckpt): they can run code."),
    executor: str = typer.Option("local", "--executor", help="local | ray: the calibration batches (HRV relevance, localisation ranking) and the threshold generations on Ray workers."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="With --executor ray: 'auto' or HOST:PORT of a running cluster (default: start a local one)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="With --executor ray: workers, each loads the model once (default: as many as the cluster has room for)."),
    gpus_per_worker: float = typer.Option(0.0, "--gpus-per-worker", help="With --executor ray: GPUs each worker takes (0: CPU workers)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Calibrate the model's audit profile, cached by model fingerprint: HRV head relevance (the category response),
    the localisation ranking with k per category (selective maps), and diagnostic thresholds set on the model's own
    generations to a flag budget (no ground truth)."""
    from tqdm import tqdm

    from auditor.calibration import calibrate_profile
    from auditor.engine.models import load_model
    from auditor.executors import ExecutionOptions, open_executor
    from auditor.engine.hrv import default_prompts
    from auditor.profile import cache_path
    from auditor.run_checks import check_generation_values, check_steps

    _check_calibration_values(budget, threshold_prompts, flag_budget, max_flag_rate, out)
    check_generation_values(steps, seed, guidance, None)
    execution = ExecutionOptions(executor, 1, ray_address, workers, gpus_per_worker)
    execution.check()
    chosen, source = _calibration_prompts(prompts)
    lm = load_model(model, device, dtype, allow_pickle, variant)
    check_steps(steps, lm.pipe)
    if chosen is None:
        chosen, source = default_prompts(budget, bundled=lm.source == "bundled", seed=seed)
    lexicon = None
    if lm.source == "bundled":
        from auditor.registry import bundled_lexicon as world_lexicon

        lexicon = world_lexicon()  # only the words the shapes world taught the model
    guidance = _guidance_for(lm, guidance)  # calibrate the model as its audits generate
    bars: dict[str, tqdm] = {}

    def progress(stage: str, n: int, total: int) -> None:  # one bar a stage, the previous one closed
        if stage not in bars:
            for b in bars.values():
                b.close()
            bars[stage] = tqdm(total=total, desc=stage, unit="prompt", file=sys.stderr)
        bars[stage].update(n)

    shards = open_executor(execution, lm, None, device, allow_pickle) if executor == "ray" else None
    try:
        prof = calibrate_profile(lm, chosen, source, budget=budget, threshold_prompts=threshold_prompts,
                                 flag_budget=flag_budget, max_flag_rate=max_flag_rate, steps=steps,
                                 guidance=guidance, seed=seed, lexicon=lexicon, progress=progress, executor=shards)
    finally:
        if shards is not None:
            shards.close()
        for b in bars.values():
            b.close()
    saved = [prof.save(cache_path(lm.fingerprint))] + ([prof.save(out)] if out else [])
    summary = {"model": lm.to_json(), "saved": [str(p) for p in saved], **prof.summary()}
    if as_json:
        _print_json(summary)
    else:
        _print_calibration(prof, saved, source, threshold_prompts, flag_budget)


def _check_calibration_values(budget: int, threshold_prompts: int, flag_budget: float, max_flag_rate: float,
                              out: str | None) -> None:
    """One-line errors for calibrate's own numeric options and --out, before anything loads."""
    if budget < 1:
        raise AuditorError(f"--budget {budget}: must be at least 1 prompt")
    if threshold_prompts < 0:
        raise AuditorError(f"--threshold-prompts {threshold_prompts}: must be at least 0")
    if not 0.0 < flag_budget < 1.0:
        raise AuditorError(f"--flag-budget {flag_budget}: must be between 0 and 1")
    if not 0.0 <= max_flag_rate < 1.0:
        raise AuditorError(f"--max-flag-rate {max_flag_rate}: must be at least 0 and below 1")
    if out is not None and Path(out).suffix != ".json":
        raise AuditorError(f"--out {out}: a profile is a .json file")


def _print_calibration(prof, saved, source: str, threshold_prompts: int, flag_budget: float) -> None:
    """What calibrate made, for a person: where the profile went and how each part was reached."""
    rm, hr = prof.relevance, prof.ranking
    typer.echo(f"profile: {', '.join(map(str, saved))}  sha256 {prof.sha256[:16]}")
    typer.echo(f"prompts: {source}")
    typer.echo(f"relevance (HRV): {rm.budget_prompts} prompts x {rm.steps} steps "
               f"({100 * rm.budget_fraction:.2f}% of the original 2,100 x 50), agreement "
               f"{'reached' if rm.converged else 'not reached'}")
    typer.echo(f"ranking (localisation): {hr.budget_prompts} prompts, agreement "
               f"{'reached' if hr.converged else 'not reached'}; k per category "
               + ", ".join(f"{c} {k_}" for c, k_ in prof.k_per_category().items()))
    if prof.calibrated:
        a = prof.provenance["thresholds"]["achieved"]
        typer.echo(f"thresholds: set on {threshold_prompts} generations; {a['first_pass']['presumed_failures']} "
                   f"presumed failures (flagged by a first pass); {a['rate']:.1%} of the other generations' concepts "
                   f"flagged (budget {flag_budget:.0%}), {a['all_concepts_rate']:.1%} of all")
    else:
        typer.echo("thresholds: none (uncalibrated: audits will map and score, and flag nothing)")


def _calibration_prompts(spec: str | None) -> tuple[list[str] | None, str]:
    """Prompts from --prompts (a .txt file, or any suite) and how the profile names them; (None, "") by default."""
    if spec is None:
        return None, ""
    from auditor.resources import find_suite
    from auditor.suites import load_suite

    path = find_suite(spec)
    suite = load_suite(path)
    texts = [p.text for p in suite.prompts]
    if not texts:
        raise AuditorError(f"--prompts {spec}: no prompt in it")
    return texts, f"{path} ({len(texts)} prompts, sha256 {hashlib.sha256(path.read_bytes()).hexdigest()[:12]})"
