"""Optimizer-vs-optimizer comparisons on held-out optimizees: Parquet, Markdown and PNG out."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from metaopt.config import Config, OptimizerConfig, resolve_device
from metaopt.evaluate.harness import Candidate, Result, compare, rollout_losses
from metaopt.meta.checkpoint import load_checkpoint
from metaopt.optimizers import make_optimizer
from metaopt.optimizers.base import Optimizer
from metaopt.tasks import make_task


def default_output_dir(config: Config, name: str, command: str) -> Path:
    """``<output_dir of the command's section>/<name>-<timestamp>``."""
    section = config.train if command == "train" else config.evaluate
    return Path(section.output_dir) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def stretched_to(optimizer: Optimizer, steps: int) -> Optimizer:
    """``optimizer`` with its learned step schedule, if it has one, stretched over runs of ``steps``."""
    if optimizer.horizon in (None, steps):
        return optimizer
    return optimizer.with_horizon(steps)


def with_options(optimizer: Optimizer, options: dict) -> Optimizer:
    """``optimizer`` with ``options`` replacing its hyperparameters (the same meta-parameters fit it)."""
    if not options:
        return optimizer
    return make_optimizer(optimizer.kind, **{**optimizer.hyperparameters(), **options})


def candidate_for(optimizer: OptimizerConfig, device: torch.device, steps: int) -> Candidate:
    """A harness candidate for a configured built-in optimizer or a trained checkpoint; a learned
    step schedule is stretched over the evaluation's ``steps``."""
    if optimizer.checkpoint is None:
        return Candidate(optimizer.name, optimizer.build, optimizer.lr, optimizer.lr_sweep)
    learned, meta_params, _ = load_checkpoint(optimizer.checkpoint)
    learned = stretched_to(with_options(learned, optimizer.options), steps)
    return Candidate(optimizer.name, lambda lr: learned, meta_params={k: v.to(device) for k, v in meta_params.items()})


def run_evaluation(
    config: Config,
    output_dir: Path,
    show_progress: bool = True,
    leading: Sequence[Candidate] = (),
    title: str | None = None,
) -> tuple[list[Result], str]:
    """Evaluate ``leading`` candidates and every configured optimizer; write the report to
    ``output_dir`` and return the table."""
    config.require("evaluate")
    device = resolve_device(config.device)
    evaluation = config.evaluate
    candidates = [*leading, *(candidate_for(o, device, evaluation.steps) for o in evaluation.optimizers)]
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
        protocol=evaluation.protocol,
    )
    from metaopt.evaluate.report import write_report  # pandas and matplotlib: not on Ray workers' import path

    published = evaluation.protocol == "published"
    scored = f"loss before update {evaluation.steps}" if published else f"loss after {evaluation.steps} steps"
    title = title or f"{config.task.kind}: {scored} over {evaluation.runs} held-out runs"
    table = write_report(results, output_dir, title)
    return results, table


__all__ = [
    "Candidate",
    "Result",
    "candidate_for",
    "compare",
    "default_output_dir",
    "rollout_losses",
    "run_evaluation",
    "stretched_to",
    "with_options",
]
