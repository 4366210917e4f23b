"""The reading API as the package exports it (``auditor.trace``, ``auditor.trace_image``): the engine's, with
selective maps ranked by the model's audit profile when no ranking is given. The engine itself knows nothing of
profiles (they are domain records: thresholds, provenance); the lookup is handed to it here."""

from __future__ import annotations

import functools

from auditor.engine import trace as _engine
from auditor.profile import stored_ranking


@functools.wraps(_engine.trace)
def trace(pipe, *args, **kwargs):
    kwargs.setdefault("find_ranking", stored_ranking)
    return _engine.trace(pipe, *args, **kwargs)


@functools.wraps(_engine.trace_image)
def trace_image(pipe, image, prompt, *args, **kwargs):
    kwargs.setdefault("find_ranking", stored_ranking)
    return _engine.trace_image(pipe, image, prompt, *args, **kwargs)
