"""auditor: audit text-to-image diffusion models through selective head-relevance attention maps."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("auditor")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0.0.0+checkout"


def __getattr__(name: str):
    if name in ("trace", "trace_image"):
        from auditor import reading  # here, not above: torch and diffusers load only when the API is used

        return getattr(reading, name)
    raise AttributeError(f"module 'auditor' has no attribute {name!r}")


__all__ = ["__version__", "trace", "trace_image"]
