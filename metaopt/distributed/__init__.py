"""Meta-training on Ray: RolloutWorker actors feeding the single-process trainer's loop."""

import os

# Under `uv run`, Ray (by default) relaunches every worker with the driver's uv command line inside
# a copy of the working folder, where a project-local uv (.tools/bin/uv) does not exist and the
# workers never start. Workers use the interpreter metaopt is installed in instead. Must precede
# `import ray`.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

from metaopt.distributed.learner import WorkerGroup, ray_connection, ray_workers, worker_resources  # noqa: E402
from metaopt.distributed.worker import RolloutWorker, flatten, unflatten  # noqa: E402

__all__ = ["RolloutWorker", "WorkerGroup", "flatten", "ray_connection", "ray_workers", "unflatten", "worker_resources"]
