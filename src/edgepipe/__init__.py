"""edgepipe: a trained model in, a small, fast, verified edge artifact out.

`edgepipe.build(recipe, out=..., overrides=...)` and `edgepipe.load(artifact_dir)` (`edgepipe.api`) are the
Python API; importing the package stays light (no torch) until one is called."""

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "build", "load"]


def build(*args: Any, **kwargs: Any) -> Any:
    """See `edgepipe.api.build`."""
    from edgepipe.api import build as api_build

    return api_build(*args, **kwargs)


def load(*args: Any, **kwargs: Any) -> Any:
    """See `edgepipe.api.load`."""
    from edgepipe.api import load as api_load

    return api_load(*args, **kwargs)
