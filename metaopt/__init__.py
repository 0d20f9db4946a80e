"""metaopt: distributed meta-training of learned optimizers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("metaopt")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"


def __getattr__(name: str):
    """``metaopt.load_optimizer`` (``metaopt.api``), imported on first use so ``import metaopt`` stays light."""
    if name == "load_optimizer":
        from metaopt.api import load_optimizer

        return load_optimizer
    raise AttributeError(f"module 'metaopt' has no attribute {name!r}")


__all__ = ["__version__", "load_optimizer"]
