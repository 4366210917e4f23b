"""auditor: audit text-to-image diffusion models through selective head-relevance attention maps."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("auditor")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0.0.0+checkout"


def trace(pipe, **kwargs):
    """Capture per-head cross-attention while ``pipe`` generates (see ``auditor.engine.capture``)."""
    from auditor.engine.capture import trace as _trace

    return _trace(pipe, **kwargs)


__all__ = ["__version__", "trace"]
