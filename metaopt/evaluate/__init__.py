"""Optimizer-vs-optimizer comparisons on held-out optimizees: Parquet, Markdown and PNG out."""

from __future__ import annotations

import time
from pathlib import Path

from metaopt.config import Config, resolve_device
from metaopt.evaluate.harness import Candidate, Result, compare, rollout_losses
from metaopt.evaluate.report import write_report
from metaopt.tasks import make_task


def default_output_dir(config: Config, name: str) -> Path:
    """``<evaluate.output_dir>/<name>-<timestamp>``."""
    return Path(config.evaluate.output_dir) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_evaluation(config: Config, output_dir: Path, show_progress: bool = True) -> tuple[list[Result], str]:
    """Evaluate every configured optimizer; write the report to ``output_dir`` and return the table."""
    device = resolve_device(config.device)
    evaluation = config.evaluate
    candidates = [
        Candidate(name=o.name, build=o.build, lr=o.lr, lr_sweep=o.lr_sweep) for o in evaluation.optimizers
    ]
    needs_tuning = any(c.lr_sweep for c in candidates)
    results = compare(
        candidates,
        heldout_family=make_task(config.task, "meta_test", device),
        tuning_family=make_task(config.task, "meta_train", device) if needs_tuning else None,
        steps=evaluation.steps,
        runs=evaluation.runs,
        seed=evaluation.seed,
        sweep_runs=evaluation.sweep_runs,
        show_progress=show_progress,
    )
    title = f"{config.task.kind}: loss after {evaluation.steps} steps over {evaluation.runs} held-out runs"
    table = write_report(results, output_dir, title)
    return results, table


__all__ = ["Candidate", "Result", "compare", "default_output_dir", "rollout_losses", "run_evaluation"]
