"""Shared fixtures. spaCy and the CLIP tokenizer load once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def nlp():
    from auditor.nlp import load

    return load()


@pytest.fixture(scope="session")
def clip_tokenizer():
    from auditor.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture
def cli(capsys):
    """Run the console entry point in-process: ``code, out, err = cli("concepts", "a cat")``."""
    from auditor.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def saved_sd15(tmp_path_factory):
    """A tiny random SD1.5 copy saved as a diffusers folder (safetensors), once per session."""
    import tiny_pipelines as tp

    path = tmp_path_factory.mktemp("tiny-sd15")
    tp.sd15().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture
def model_copy(saved_sd15, tmp_path):
    """A private copy of the tiny SD1.5 folder (tests may change or fingerprint it)."""
    import shutil

    dst = tmp_path / "model"
    shutil.copytree(saved_sd15, dst)
    return dst
