"""The tasks of an audit run and the work of one: which (prompt, seed) pairs or given images a run holds
(``plan_tasks``), and what a worker does with a batch of them (``audit_tasks``: generate under trace, or read a
given image, then ``image_record.generation_record``). Local and Ray executors (``auditor.executors``) share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from auditor.align import text_sequence
from auditor.concepts import extract_many
from auditor.engine.families import call_kwargs
from auditor.engine.image_read import load_image
from auditor.engine.trace import trace, trace_image
from auditor.image_record import generation_record, overlays


def generate_one(pipe, prompt: str, seed: int, steps: int, guidance: float, resolution):
    """One image under trace; the generator is seeded per (prompt, seed) so a resume reproduces it exactly."""
    images, tr = generate_batch(pipe, [prompt], [seed], steps, guidance, resolution)
    return images[0], tr


def generate_batch(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float, resolution):
    """Images of several (prompt, seed) pairs in one pipeline call under one trace.

    Args:
        pipe: a loaded diffusers pipeline.
        prompts, seeds: item i of the call is ``prompts[i]`` generated from ``seeds[i]``.
        steps, guidance, resolution: as for ``generate_one``.

    Returns:
        (images, trace): ``images[i]`` is item i's image, its attention is trace item ``tr.item(i)``.
    """
    # One generator per item: diffusers draws each item's latents (and any scheduler noise) from its own generator,
    # so an item's image does not depend on what else is in the batch. A single pair keeps the plain single-prompt
    # call, exactly what runs made before batching did.
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    size = {"height": resolution[0], "width": resolution[1]} if resolution else {}
    prompt = prompts[0] if len(prompts) == 1 else list(prompts)
    # Only the prompts' own token columns: an audit reads words, never padding, and a transformer's recorder then
    # scores far fewer text keys (a T5 sequence is mostly padding).
    with trace(pipe, tokens="prompt") as tr:
        images = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance,
                      generator=gens[0] if len(gens) == 1 else gens, **size, **call_kwargs(pipe)).images
    return images, tr


@dataclass(frozen=True)
class AuditTask:
    """One (prompt, seed) of a run: everything a worker needs besides the model and the ``TaskSettings``."""

    prompt_id: str
    seed: int
    concepts: object  # auditor.concepts.Concepts of the prompt as parsed (token indices refer to ``.prompt``)
    tags: tuple[str, ...] = ()
    image: str | None = None  # a given image to read instead of generating one (--images)


@dataclass(frozen=True)
class TaskSettings:
    """What every task of a run shares (sent to each worker once)."""

    steps: int
    guidance: float
    resolution: tuple[int, int] | None
    profile: object  # auditor.profile.AuditProfile
    k: int | None = None
    reading: tuple[tuple[int, ...], int] | None = None  # (timesteps, draws) when tasks read given images


@dataclass
class TaskResult:
    """A finished generation as the store takes it: the image, concept records, raw maps, overlays."""

    image: object
    concepts: list
    raw_maps: dict
    overlays: dict


def audit_tasks(pipe, tasks: Sequence[AuditTask], settings: TaskSettings) -> list[TaskResult]:
    """The per-generation audit of a batch of tasks: one pipeline call under trace, then each item's records.

    Args:
        pipe: the loaded pipeline (local, or a Ray worker's own copy).
        tasks: the (prompt, seed) pairs of one pipeline call; one task is batch size 1.
        settings: steps, guidance, resolution, the audit profile and --k.

    Returns:
        One ``TaskResult`` per task, in the order of ``tasks``.
    """
    if settings.reading is not None:
        return [read_task(pipe, t, settings) for t in tasks]
    images, tr = generate_batch(pipe, [t.concepts.prompt for t in tasks], [t.seed for t in tasks],
                                settings.steps, settings.guidance, settings.resolution)
    results = []
    for i, (task, image) in enumerate(zip(tasks, images)):
        concepts, raw_maps, norms = generation_record(tr, task.concepts, settings.profile, image, settings.k,
                                                      item=tr.item(i))
        results.append(TaskResult(image, concepts, raw_maps, overlays(image, norms, concepts)))
    return results


def read_task(pipe, task: AuditTask, settings: TaskSettings) -> TaskResult:
    """The per-image audit of a given image: read with its prompt (``trace_image``, noise seeded by the task's
    seed), then the same records a generation gets."""
    image = load_image(task.image)
    timesteps, draws = settings.reading
    tr = trace_image(pipe, image, task.concepts.prompt, timesteps=timesteps, seed=task.seed, draws=draws,
                     tokens="prompt")
    concepts, raw_maps, norms = generation_record(tr, task.concepts, settings.profile, image, settings.k)
    return TaskResult(image, concepts, raw_maps, overlays(image, norms, concepts))


def task_row(task: AuditTask, result: TaskResult) -> dict:
    """The store row of a finished task (its image and maps are stored beside it)."""
    cs = task.concepts
    row = {"prompt_id": task.prompt_id, "prompt": cs.prompt, "seed": int(task.seed), "tags": list(task.tags),
           "concepts": result.concepts}
    if cs.original is not None:
        row["prompt_as_given"], row["prompt_changes"] = cs.original, list(cs.changes)
    return row


def plan_tasks(suite, suite_path: Path, seeds, pipe, given=None) -> list[AuditTask]:
    """Every task of the run in order, each with its prompt's concepts: every (prompt, seed) of the suite, or one
    task per given image. Prompts the model would truncate are refused here, before anything is written."""
    by_id = {p.id: p for p in suite.prompts}
    if given is None:
        rows = [(p.id, s, tuple(p.tags), None) for p in suite.prompts for s in seeds]
        sources = dict(by_id)
    else:
        rows = [(g.prompt_id, g.seed, g.tags, str(g.path)) for g in given]
        # a suite prompt keeps its per-word overrides; a prompt outside the suite is its text
        sources = {g.prompt_id: by_id.get(g.prompt_id, g.prompt) for g in given}
    tokens = text_sequence(pipe)
    extracted = dict(zip(sources, extract_many(list(sources.values()), tokenizer=tokens)))
    for pid, cs in extracted.items():
        cs.refuse_if_truncated(f"{suite_path}: prompt {pid!r}", tokens)
    return [AuditTask(pid, int(seed), extracted[pid], tags, image) for pid, seed, tags, image in rows]
