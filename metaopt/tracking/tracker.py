"""One MLflow run per meta-training run, written only by the driver, that never stops training.

Every write goes through ``RunTracker``: when the tracking server cannot be reached, the write
is retried (MLflow's own HTTP retries, bounded here), then appended to ``mlflow_buffer.jsonl`` in
the run folder with a warning, and training carries on. Later writes replay the buffer first once
the server answers again; ``metaopt sync RUN_DIR`` replays it by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from metaopt import __version__

BUFFER = "mlflow_buffer.jsonl"
RUN_FILE = "mlflow_run.json"  # the run's id and tracking URI, once the run exists
RETRY_OFFLINE_S = 30.0  # while unreachable, try the server again at most this often
DEFAULT_EXPERIMENT = "metaopt"
# Bounded HTTP retries for every request metaopt makes to MLflow (training's writes, the registry's
# reads): with MLflow's defaults (7 retries, 120 s timeout) a server that does not answer stalls either
# for minutes; with these a request to it fails within 2 x 10 s.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def bound_http_requests() -> None:
    """MLflow's HTTP retries and timeout as ``HTTP_DEFAULTS``, where the environment does not set them."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def local_store(uri: str) -> str | None:
    """The path of a local MLflow store (a SQLite file or a folder) as written in ``uri``; None for a server,
    another database, Databricks or an in-memory SQLite."""
    if uri in ("databricks", "databricks-uc", "uc"):  # what MLflow reads as no path
        return None
    parts = urlsplit(uri)
    if parts.scheme == "sqlite":
        return unquote(parts.path[1:]) if parts.path not in ("", "/:memory:") else None
    return unquote(parts.path) if parts.scheme in ("", "file") else None


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new ``experiment`` in the store at ``uri`` keeps its artifacts: ``mlruns/EXPERIMENT`` beside a
    SQLite store's file (MLflow would use the creating process's ``./mlruns``, wherever that runs: in a Ray
    job, a temporary copy of the working folder); None, MLflow's choice, for other stores."""
    path = local_store(uri) if uri.startswith("sqlite:") else None
    return (Path(path).resolve().parent / "mlruns" / experiment).as_uri() if path else None


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config sections as MLflow params: ``train.estimator.kind`` → ``"tbptt"``."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat


def git_commit() -> str | None:
    """The checkout's commit, if it is a git checkout."""
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                check=True,
                cwd=Path(__file__).resolve().parent,
                timeout=5,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


# Answers from a reachable store that refuse a write (e.g. a param changed on --resume): retrying
# cannot help, so the write is dropped with a warning instead of blocking the buffer behind it.
REJECTED = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_ALREADY_EXISTS",
    "RESOURCE_DOES_NOT_EXIST",
    "BAD_REQUEST",
    "PERMISSION_DENIED",
    "INVALID_STATE",
}


def _rejected(error: Exception) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(error, MlflowException) and error.error_code in REJECTED


def _warn_rejected(op: dict, error: Exception) -> None:
    warnings.warn(
        f"MLflow refused a {op['op']} write ({str(error).splitlines()[0][:300]}); it is skipped, training continues",
        stacklevel=4,
    )


class RunTracker:
    """The MLflow run of the meta-training run in ``run_dir``.

    ``tracking_uri``: any MLflow tracking URI; default ``MLFLOW_TRACKING_URI`` or MLflow's own
    default (a local SQLite store, ``sqlite:///mlflow.db``, with artifacts in ``./mlruns``).
    """

    def __init__(
        self,
        run_dir: Path,
        tracking_uri: str | None = None,
        experiment: str = DEFAULT_EXPERIMENT,
        run_name: str | None = None,
        parent_run_id: str | None = None,
        start: bool = True,
    ):
        import mlflow
        from mlflow import MlflowClient

        bound_http_requests()
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        saved = self.run_dir / RUN_FILE
        known = json.loads(saved.read_text()) if saved.exists() else {}
        self.tracking_uri = tracking_uri or known.get("tracking_uri") or mlflow.get_tracking_uri()
        self.client = MlflowClient(self.tracking_uri)
        self.experiment, self.run_name, self.parent_run_id = experiment, run_name or self.run_dir.name, parent_run_id
        self.offline_since: float | None = None
        self.run_id: str | None = known.get("run_id")  # a resumed run continues its MLflow run
        self._save_run_file()
        if start:
            self._write({"op": "create_run"} if self.run_id is None else {"op": "resume_run"})

    # --- what the trainer and CLI call ----------------------------------------------------------

    def log_params(self, params: dict[str, Any]) -> None:
        self._write({"op": "params", "params": {k: str(v)[:6000] for k, v in params.items()}})

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._write(
            {
                "op": "metrics",
                "step": step,
                "timestamp": int(time.time() * 1000),
                "metrics": {k: float(v) for k, v in metrics.items()},
            }
        )

    def log_artifacts(self, local_dir: Path, artifact_path: str | None = None) -> None:
        self._write({"op": "artifacts", "local_dir": str(Path(local_dir).resolve()), "artifact_path": artifact_path})

    def log_artifacts_file(self, local_file: Path, artifact_path: str | None = None) -> None:
        self._write({"op": "artifact", "local_file": str(Path(local_file).resolve()), "artifact_path": artifact_path})

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._write({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def finish(self, status: str = "FINISHED") -> None:
        self._write({"op": "terminate", "status": status})

    @property
    def buffered(self) -> int:
        """Writes waiting in the buffer file for the server."""
        buffer = self.run_dir / BUFFER
        return sum(1 for _ in buffer.open()) if buffer.exists() else 0

    def sync(self) -> int:
        """Replay the buffer; return how many writes are still waiting (0: all delivered)."""
        self.offline_since = None
        self._replay()
        return self.buffered

    # --- internals ------------------------------------------------------------------------------

    def _write(self, op: dict) -> None:
        """Deliver ``op`` now if the server answers (after replaying any backlog), else buffer it."""
        if self.offline_since is not None and time.monotonic() - self.offline_since < RETRY_OFFLINE_S:
            self._buffer(op)
            return
        if self.buffered and not self._replay():
            self._buffer(op)
            return
        try:
            self._apply(op)
            self.offline_since = None
        except Exception as error:  # noqa: BLE001 - any failure to reach the store must not stop training
            if _rejected(error):
                _warn_rejected(op, error)
                return
            self._went_offline(error)
            self._buffer(op)

    def _replay(self) -> bool:
        """Deliver buffered writes in order; keep the rest if the server fails again."""
        buffer = self.run_dir / BUFFER
        if not buffer.exists():
            return True
        pending = [json.loads(line) for line in buffer.read_text().splitlines() if line.strip()]
        for index, op in enumerate(pending):
            try:
                self._apply(op)
            except Exception as error:  # noqa: BLE001
                if _rejected(error):  # the server answered and refused: retrying cannot help
                    _warn_rejected(op, error)
                    continue
                self._went_offline(error)
                buffer.write_text("".join(json.dumps(o) + "\n" for o in pending[index:]))
                return False
        buffer.unlink()
        warnings.warn(
            f"MLflow tracking at {self.tracking_uri} is reachable again: delivered {len(pending)} "
            f"buffered write(s) to run {self.run_id}",
            stacklevel=3,
        )
        return True

    def _went_offline(self, error: Exception) -> None:
        if self.offline_since is None:
            warnings.warn(
                f"MLflow tracking at {self.tracking_uri} is unreachable ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:200]}); training continues, checkpoints stay in {self.run_dir}, and "
                f"tracking writes are buffered in {self.run_dir / BUFFER} until it answers again "
                f"(or run `metaopt sync {self.run_dir}`)",
                stacklevel=4,
            )
        self.offline_since = time.monotonic()

    def _buffer(self, op: dict) -> None:
        with (self.run_dir / BUFFER).open("a") as buffer:
            buffer.write(json.dumps(op) + "\n")

    def _apply(self, op: dict) -> None:
        from mlflow.entities import Metric, Param, RunTag

        kind = op["op"]
        if kind == "create_run":
            if self.run_id is None:
                self._create_run()
        elif kind == "resume_run":
            self.client.update_run(self.run_id, status="RUNNING")
        elif kind == "params":
            items = [Param(k, v) for k, v in op["params"].items()]
            for start in range(0, len(items), 100):  # MLflow's batch limit for params
                self.client.log_batch(self.run_id, params=items[start : start + 100])
        elif kind == "metrics":
            metrics = [Metric(k, v, op["timestamp"], op["step"]) for k, v in op["metrics"].items()]
            self.client.log_batch(self.run_id, metrics=metrics)
        elif kind == "tags":
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in op["tags"].items()])
        elif kind == "artifacts":
            self.client.log_artifacts(self.run_id, op["local_dir"], op["artifact_path"])
        elif kind == "artifact":
            self.client.log_artifact(self.run_id, op["local_file"], op["artifact_path"])
        elif kind == "terminate":
            self.client.set_terminated(self.run_id, op["status"])

    def _create_run(self) -> None:
        experiment = self.client.get_experiment_by_name(self.experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment
            else self.client.create_experiment(self.experiment, artifact_location(self.tracking_uri, self.experiment))
        )
        tags = {"metaopt.version": __version__, "mlflow.source.name": "metaopt train"}
        if commit := git_commit():
            tags["mlflow.source.git.commit"] = commit
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        run = self.client.create_run(experiment_id, run_name=self.run_name, tags=tags)
        self.run_id = run.info.run_id
        self._save_run_file()

    def _save_run_file(self) -> None:
        (self.run_dir / RUN_FILE).write_text(json.dumps({"run_id": self.run_id, "tracking_uri": self.tracking_uri}))
