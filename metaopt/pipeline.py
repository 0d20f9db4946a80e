"""Meta-training's one pipeline, shared by ``metaopt train``, the Ray job entrypoints and Tune: where the
meta-gradients come from, then, after training, compare -> track -> register."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metaopt.config import Config
from metaopt.evaluate import Candidate, run_evaluation
from metaopt.meta.trainer import BEST


def gradient_source(config: Config, address: str | None = None) -> AbstractContextManager:
    """Ray RolloutWorkers on the cluster at ``address`` for a config with a ``distributed`` section (inside a
    Tune trial they land in the trial's placement group), else None: the in-process estimator."""
    if config.distributed is None:
        return contextlib.nullcontext(None)
    from metaopt.distributed import ray_workers

    return ray_workers(config, address)


@dataclass
class Outcome:
    """What the pipeline produced: the comparison table and, where registered, the model version."""

    table: str
    registered_version: int | None = None
    register_error: str | None = None  # why registering failed; the run and its checkpoints are saved either way


def compare_track_register(
    config: Config,
    run_dir: Path,
    leading: Sequence[Candidate],
    title: str,
    tracker=None,
    register: tuple[str, str] | None = None,
    tags: dict[str, Any] | None = None,
    artifacts: Sequence[tuple[Path, str | None]] = (),
    show_progress: bool = True,
) -> Outcome:
    """Compare ``leading`` (the trained optimizer first) with ``config.evaluate``'s optimizers on the held-out
    optimizees, writing ``run_dir/evaluation``. With a ``tracker`` (a ``RunTracker``), log ``run_dir``'s best
    checkpoint, evaluation and ``config.yaml``, and ``artifacts`` (path, artifact path), to its MLflow run, end
    the run, and register the best checkpoint as ``register`` (name, alias) with version ``tags`` once every
    write has arrived."""
    _, table = run_evaluation(config, run_dir / "evaluation", show_progress, leading, title)
    outcome = Outcome(table)
    if tracker is None:
        return outcome
    for path, artifact_path in (
        (run_dir / "checkpoints" / BEST, f"checkpoints/{BEST}"),
        (run_dir / "evaluation", "evaluation"),
        (run_dir / "config.yaml", None),
        *artifacts,
    ):
        if path.is_dir():
            tracker.log_artifacts(path, artifact_path)
        else:
            tracker.log_artifacts_file(path, artifact_path)
    tracker.finish()
    if register is None or tracker.buffered:
        return outcome
    from metaopt.tracking.registry import register_run

    name, alias = register
    try:
        outcome.registered_version = register_run(
            tracker.run_id, name, alias, tracking_uri=tracker.tracking_uri, run_dir=run_dir, **(tags or {})
        )
    except Exception as error:  # noqa: BLE001 - the trained optimizer is safe on disk either way
        outcome.register_error = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    return outcome
