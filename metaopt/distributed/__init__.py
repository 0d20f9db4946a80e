"""Meta-training on Ray: RolloutWorker actors feeding the single-process trainer's loop."""

from metaopt.distributed.learner import WorkerGroup, ray_workers
from metaopt.distributed.worker import RolloutWorker, flatten, unflatten

__all__ = ["RolloutWorker", "WorkerGroup", "flatten", "ray_workers", "unflatten"]
