"""metaopt: distributed meta-training of learned optimizers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("metaopt")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"


def load_optimizer(source, params, **options):
    """A trained optimizer as a ``torch.optim.Optimizer`` for ``params``; see ``metaopt.tracking.load_optimizer``."""
    from metaopt.tracking.registry import load_optimizer as load

    return load(source, params, **options)
