"""metaopt: distributed meta-training of learned optimizers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("metaopt")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
