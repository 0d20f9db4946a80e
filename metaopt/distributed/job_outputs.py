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
from urllib.parse import unquote, urlsplit

from metaopt.config import ConfigError

WORKING_FOLDER = "the job's working folder, a temporary copy that Ray deletes"


def require_lasting(output: str, tracking_uri: str | None, experiment: str | None) -> None:
    """Raises ConfigError unless the output folder and the MLflow store (``experiment`` None: tracking off)
    outlive the job; a new experiment in a local SQLite store keeps its artifacts beside the store."""
    if not Path(output).is_absolute():
        raise ConfigError(
            f"the output folder {output} is relative to {WORKING_FOLDER}: give --output (and --resume) an absolute path"
        )
    if experiment is None:
        return
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    path = _local_store(uri) if uri else None
    if uri is None or (path is not None and not os.path.isabs(path)):
        store = uri or "sqlite:///mlflow.db (MLflow's default)"
        raise ConfigError(
            f"the MLflow store {store} is relative to {WORKING_FOLDER}: track to an absolute store "
            "(--tracking-uri sqlite:////ABSOLUTE/PATH/mlflow.db), a server (--tracking-uri http://HOST:5000), "
            "or not at all (--no-tracking)"
        )
    if uri.startswith("sqlite:") and path:
        _artifacts_beside(uri, Path(path), experiment)


def checked_first(check: Callable[[argparse.Namespace], None], handler: Callable[[argparse.Namespace], int]):
    """``handler`` run after ``check``, so that ``metaopt.cli.run`` reports check's errors as one line too."""

    def checked(args: argparse.Namespace) -> int:
        check(args)
        return handler(args)

    return checked


def _local_store(uri: str) -> str | None:
    """The path of a local MLflow store (a SQLite file or a folder); None for a server, another database,
    Databricks or an in-memory SQLite."""
    if uri in ("databricks", "databricks-uc", "uc"):  # what MLflow reads as no path
        return None
    parts = urlsplit(uri)
    if parts.scheme == "sqlite":
        return unquote(parts.path[1:]) if parts.path not in ("", "/:memory:") else None
    return unquote(parts.path) if parts.scheme in ("", "file") else None


def _artifacts_beside(uri: str, database: Path, experiment: str) -> None:
    """Creates ``experiment`` with its artifacts in ``mlruns/`` beside the SQLite ``database``, unless it exists:
    MLflow would put a new experiment's artifacts in the creating process's ``./mlruns``, the job's working folder."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    if client.get_experiment_by_name(experiment) is None:
        client.create_experiment(experiment, artifact_location=(database.parent / "mlruns" / experiment).as_uri())
