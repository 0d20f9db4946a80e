"""MLflow: tracked meta-training runs, the model registry, and ``load_optimizer``.

Only the driver (the learner) writes to MLflow; Ray workers never open a connection.
"""

from metaopt.tracking.registry import RegistryError, load_optimizer, register_optimizer, resolve_checkpoint
from metaopt.tracking.tracker import RunTracker

__all__ = ["RegistryError", "RunTracker", "load_optimizer", "register_optimizer", "resolve_checkpoint"]
