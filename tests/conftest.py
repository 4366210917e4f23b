"""Shared fixtures. spaCy and the CLIP tokenizer load once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def nlp():
    from auditor.nlp import load

    return load()


@pytest.fixture(scope="session")
def clip_tokenizer():
    from auditor.zoo.bpe import load_tokenizer

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
