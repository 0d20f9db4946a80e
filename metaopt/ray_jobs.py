"""Where a Ray job's run folder and MLflow store go: outside the job's working folder, which Ray deletes.

A job runs in a copy of what ``ray job submit --working-dir`` uploaded, under the head's Ray temp dir
(``.../runtime_resources/working_dir_files/_ray_pkg_HASH``), so a relative path or MLflow's default store
(``sqlite:///mlflow.db``, artifacts in ``./mlruns``) would land there and be lost.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from metaopt.config import ConfigError
from metaopt.tracking.tracker import local_store

WORKING_FOLDER = "the job's working folder, a temporary copy that Ray deletes"


def require_lasting(output: str, tracking_uri: str | None, tracking: bool) -> None:
    """Raises ConfigError unless the output folder and, with ``tracking`` on, the MLflow store outlive the job
    (a new experiment in a SQLite store keeps its artifacts beside the store: the tracker's
    ``artifact_location``)."""
    if not Path(output).is_absolute():
        raise ConfigError(
            f"the output folder {output} is relative to {WORKING_FOLDER}: give --output (and --resume) an absolute path"
        )
    if not tracking:
        return
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    path = local_store(uri) if uri else None
    if uri is None or (path is not None and not os.path.isabs(path)):
        store = uri or "sqlite:///mlflow.db (MLflow's default)"
        raise ConfigError(
            f"the MLflow store {store} is relative to {WORKING_FOLDER}: track to an absolute store "
            "(--tracking-uri sqlite:////ABSOLUTE/PATH/mlflow.db), a server (--tracking-uri http://HOST:5000), "
            "or not at all (--no-tracking)"
        )


def checked_first(check: Callable[[argparse.Namespace], None], handler: Callable[[argparse.Namespace], int]):
    """``handler`` run after ``check``, so that ``metaopt.cli.run`` reports check's errors as one line too."""

    def checked(args: argparse.Namespace) -> int:
        check(args)
        return handler(args)

    return checked
