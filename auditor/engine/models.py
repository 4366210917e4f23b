"""Resolve a model spec to a loaded pipeline, safely and offline, with a fingerprint of its weights.

A spec is a bundled name (``shapes-v1``), a local diffusers folder (``model_index.json``), or a hub id, which
is used only when it is already in the local Hugging Face cache: nothing is ever downloaded. Weights load from
safetensors; pickle checkpoints (.bin/.ckpt/.pt/.pth) are refused unless ``allow_pickle`` is set, because
unpickling runs code. The fingerprint is a sha256 over the sorted relative paths and content hashes of the weight
files; file hashes are cached by (path, size, mtime) in the user cache folder so repeated runs do not rehash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
import weakref
from dataclasses import dataclass
from pathlib import Path

from auditor import registry
from auditor.engine.heads import denoiser_of
from auditor.errors import AuditorError

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
WEIGHT_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("float32", "float16", "bfloat16")
PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline",
             "PixArtAlphaPipeline", "PixArtSigmaPipeline")
# The model families those pipelines load, in words (CLI help, errors).
FAMILIES = ("Stable Diffusion 1.x and 2.x (StableDiffusionPipeline), SDXL (StableDiffusionXLPipeline), SD3/SD3.5 "
            "(StableDiffusion3Pipeline), Flux (FluxPipeline) and PixArt-α/Σ (PixArtAlphaPipeline, PixArtSigmaPipeline)")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    """The user cache folder for fingerprints and relevance matrices (XDG_CACHE_HOME moves it on Linux)."""
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("auditor"))


@dataclass
class LoadedModel:
    name: str  # what the user asked for
    path: Path  # the diffusers folder
    source: str  # "bundled" | "local" | "hub-cache"
    pipe: object
    fingerprint: str
    device: str
    dtype: str
    variant: str | None = None  # the weight files' variant (model.fp16.safetensors: "fp16"); None: the plain files

    @property
    def kind(self) -> str:
        return "sdxl" if type(self.pipe).__name__ == "StableDiffusionXLPipeline" else "sd"

    def to_json(self) -> dict:
        return {"name": self.name, "path": str(self.path), "source": self.source, "fingerprint": self.fingerprint,
                "pipeline": type(self.pipe).__name__, "device": self.device, "dtype": self.dtype,
                "variant": self.variant}


# --- resolution -----------------------------------------------------------------------------------------------


def resolve(spec: str) -> tuple[Path, str]:
    """(diffusers folder, source) for a model spec; an AuditorError naming ``spec`` when it is none of the three."""
    bundled = registry.installed_models()
    if spec in bundled:
        return bundled[spec], "bundled"
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            raise AuditorError(f"model {spec}: a single checkpoint file is not supported; "
                               "pass a diffusers folder (with model_index.json)", "model")
        if not (path / "model_index.json").is_file():
            raise AuditorError(f"model {spec}: no model_index.json in this folder (not a diffusers pipeline)", "model")
        return path, "local"
    owner = registry.owner_of(spec)
    if owner is not None:
        raise AuditorError(f"model {spec}: bundled model is not installed "
                           f"(no {owner.folder / spec / 'model_index.json'})", "model")
    if _HUB_ID.match(spec):
        snap = _hub_cache_folder(spec)
        if snap is not None:
            return snap, "hub-cache"
        raise AuditorError(f"model {spec}: hub id not found locally and not available offline "
                           "(auditor never downloads; put a diffusers folder on disk and pass its path)", "model")
    names = ", ".join(sorted(bundled)) or "none installed"
    raise AuditorError(f"model {spec}: not a bundled model ({names}), a local diffusers folder, or a hub id", "model")


def _hub_cache_folder(repo_id: str) -> Path | None:
    """The snapshot folder of ``repo_id`` in the local Hugging Face cache, when one was downloaded before."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, "model_index.json")
    return Path(found).parent if isinstance(found, str) else None


# --- weight files: safety and fingerprint ---------------------------------------------------------------------


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())


def variant_of(path: Path) -> str | None:
    """The variant a weight file belongs to: diffusers names them ``model.fp16.safetensors`` (sharded:
    ``model.fp16-00001-of-00002.safetensors``); the plain files have none."""
    parts = path.name[: -len(path.suffix)].split(".")
    return parts[-1].split("-")[0] if len(parts) > 1 else None


def check_variant(folder: Path, variant: str | None, spec: str) -> None:
    """Refuse a variant the folder has no files of, and a plain load of a folder that holds only variants (SDXL
    repositories often ship only fp16 files), naming the ``--variant`` that would load it."""
    found = {variant_of(p) for p in weight_files(folder)}
    named = sorted(v for v in found if v is not None)
    if variant is not None and variant not in found:
        have = f"it has {', '.join(named)}" if named else "it has only plain weight files"
        raise AuditorError(f"variant {variant}: no weight file of that variant in {folder} ({have})", "variant")
    if variant is None and named and None not in found:
        raise AuditorError(f"model {spec}: {folder} holds only the {', '.join(named)} variant of its weights "
                           f"(e.g. model.{named[0]}.safetensors): pass `variant={named[0]}`", "model")


def check_weights(folder: Path, allow_pickle: bool = False) -> None:
    """Refuse pickle-only components (unless allowed) and safetensors files whose header does not hold together."""
    files = weight_files(folder)
    safe_dirs = {p.parent for p in files if p.suffix == ".safetensors"}
    for p in files:
        if p.suffix in PICKLE_SUFFIXES and p.parent not in safe_dirs and not allow_pickle:
            raise AuditorError(f"{p}: pickle checkpoint refused (unpickling can run code); convert it to "
                               "safetensors or pass `allow_pickle=True` if you trust it")
        if p.suffix == ".safetensors":
            _check_safetensors(p)


def _check_safetensors(path: Path) -> None:
    """The header must parse and every tensor's byte range must lie inside the file."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
        data = size - 8 - n
        for name, t in header.items():
            if name == "__metadata__":
                continue
            start, end = t["data_offsets"]
            if not 0 <= start <= end <= data:
                raise ValueError(f"tensor {name} lies outside the file")
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise AuditorError(f"{path}: corrupt safetensors file ({exc})") from None


def _file_sha256(path: Path, memo: dict) -> str:
    real = path.resolve()  # hub-cache snapshots are symlinks into blobs
    st = real.stat()
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
    if key not in memo:
        h = hashlib.sha256()
        with open(real, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        memo[key] = h.hexdigest()
    return memo[key]


def fingerprint(folder: Path, variant: str | None = None) -> str:
    """sha256 over (relative path, content sha256) of every weight file, in path order, and the variant loaded
    (one folder's fp16 and plain weights are two models; a plain load hashes exactly as before variants)."""
    folder = Path(folder)
    memo_file = cache_dir() / "file-hashes.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    before = len(memo)
    h = hashlib.sha256()
    if variant is not None:
        h.update(f"variant\0{variant}\n".encode())
    files = weight_files(folder)
    if not files:
        raise AuditorError(f"{folder}: no weight files (.safetensors) to fingerprint")
    for p in files:
        h.update(f"{p.relative_to(folder).as_posix()}\0{_file_sha256(p, memo)}\n".encode())
    if len(memo) != before:
        try:  # a read-only cache only costs rehashing next time
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo))
            tmp.replace(memo_file)
        except OSError:
            pass
    return h.hexdigest()


# Fingerprints of pipelines loaded here, so later stages (relevance lookup) need not rehash or be told.
_PIPE_FINGERPRINTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_PIPE_FOLDERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def fingerprint_of(pipe) -> str | None:
    """The weights fingerprint of a pipeline: known if loaded here, else computed from its folder, else None."""
    net = denoiser_of(pipe)
    if net in _PIPE_FINGERPRINTS:
        return _PIPE_FINGERPRINTS[net]
    folder = folder_of(pipe)
    if folder is None:
        return None
    fp = fingerprint(folder)
    _PIPE_FINGERPRINTS[net] = fp
    return fp


def folder_of(pipe) -> Path | None:
    """The diffusers folder a pipeline was loaded from, when it came from disk."""
    net = denoiser_of(pipe)
    if net in _PIPE_FOLDERS:
        return _PIPE_FOLDERS[net]
    name = getattr(getattr(pipe, "config", None), "_name_or_path", None) or getattr(pipe, "name_or_path", None)
    if name and (Path(name) / "model_index.json").is_file():
        return Path(name)
    return None


# --- loading --------------------------------------------------------------------------------------------------


def pick_device(device: str = "auto") -> str:
    import torch

    if device not in DEVICES:
        raise AuditorError(f"device {device}: expected one of {', '.join(DEVICES)}", "device")
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise AuditorError("device cuda: no CUDA device is available", "device")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise AuditorError("device mps: no MPS device is available", "device")
    return device


def pipeline_class(folder: Path):
    try:
        name = json.loads((folder / "model_index.json").read_text())["_class_name"]
    except (OSError, ValueError, KeyError) as exc:
        raise AuditorError(f"{folder / 'model_index.json'}: unreadable ({exc})") from None
    if name not in PIPELINES:
        raise AuditorError(f"{folder}: pipeline {name} is not supported (supported: {FAMILIES})")
    import diffusers

    return getattr(diffusers, name)


def _dtype_keyword() -> str:
    """diffusers renamed ``torch_dtype`` to ``dtype`` (0.36) and warns on the old name; older ones know only it."""
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__) >= Version("0.36") else "torch_dtype"


@contextlib.contextmanager
def _quiet_loading():
    """No per-component progress bars while loading (they would interleave with the CLI's own output)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    was = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            dlog.enable_progress_bar()
        if was[1]:
            tlog.enable_progress_bar()


def load_model(spec: str, device: str = "auto", dtype: str = "float32", allow_pickle: bool = False,
               variant: str | None = None) -> LoadedModel:
    """Resolve, check and load ``spec`` (see the module docstring); every failure is a one-line AuditorError."""
    import torch

    if dtype not in DTYPES:
        raise AuditorError(f"dtype {dtype}: expected one of {', '.join(DTYPES)}", "dtype")
    folder, source = resolve(spec)
    check_weights(folder, allow_pickle)
    check_variant(folder, variant, spec)
    cls = pipeline_class(folder)
    dev = pick_device(device)
    fp = fingerprint(folder, variant)
    # use_safetensors=True makes diffusers fail rather than fall back to a pickle; None lets it prefer safetensors.
    kwargs = dict(local_files_only=True, use_safetensors=None if allow_pickle else True)
    kwargs[_dtype_keyword()] = getattr(torch, dtype)
    if variant is not None:
        kwargs["variant"] = variant
    if cls.__name__ == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        with _quiet_loading():
            pipe = cls.from_pretrained(str(folder), **kwargs)
    except Exception as exc:  # diffusers raises OSError/ValueError/EnvironmentError/safetensors errors alike
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AuditorError(f"model {spec}: cannot load {folder}: {first}", "model") from None
    pipe = pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    if source == "bundled" and dev == "cpu":
        # The bundled model's tensors are tiny: a second intra-op thread buys nothing, and on a busy machine its
        # spin-waiting made generations 15-25x slower (docs/benchmarks.md).
        torch.set_num_threads(1)
    _PIPE_FINGERPRINTS[denoiser_of(pipe)] = fp
    _PIPE_FOLDERS[denoiser_of(pipe)] = folder
    return LoadedModel(spec, folder, source, pipe, fp, dev, dtype, variant)
