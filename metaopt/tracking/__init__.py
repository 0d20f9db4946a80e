"""MLflow: tracked meta-training runs and the model registry of trained optimizers.

Only the driver (the learner) writes to MLflow; Ray workers never open a connection.
"""

from metaopt.tracking.registry import RegistryError, register_optimizer, resolve_checkpoint
from metaopt.tracking.tracker import RunTracker

__all__ = ["RegistryError", "RunTracker", "register_optimizer", "resolve_checkpoint"]
