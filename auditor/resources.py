"""Where shipped data lives: templates, prompt suites, bundled models (checkout or installed wheel)."""

from __future__ import annotations

from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent


def _data_dir(name: str) -> Path:
    # A checkout has the folder at the top level; a wheel ships it as the package auditor.<name>.
    here = _CHECKOUT / name
    if here.is_dir() and (_CHECKOUT / "pyproject.toml").is_file():
        return here
    # Installed: package-dir maps the folder to auditor/<name> next to this file.
    return Path(__file__).resolve().parent / name


def templates_dir() -> Path:
    return _data_dir("templates")


def suites_dir() -> Path:
    return _data_dir("prompt_suites")


def zoo_dir() -> Path:
    return Path(__file__).resolve().parent / "zoo"


def find_suite(name_or_path: str) -> Path:
    """A suite given as a path, or by the name of a shipped suite ("shapes-default")."""
    p = Path(name_or_path)
    if p.exists() or p.suffix in (".yaml", ".yml", ".txt") and p.parent != Path("."):
        return p
    for cand in (suites_dir() / name_or_path, suites_dir() / f"{name_or_path}.yaml"):
        if cand.is_file():
            return cand
    return p
