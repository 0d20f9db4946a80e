"""Single-process meta-training: estimate a meta-gradient, clip it, take an Adam meta-step.

The whole loop reads top to bottom in ``MetaTrainer.train``. Nothing here imports Ray or MLflow;
``on_metrics`` is how a caller (the CLI, a tracker) sees progress, and the gradient source is
pluggable: the Ray learner is this same loop with RolloutWorker actors as its gradient source.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from metaopt.config import Config, resolve_device
from metaopt.meta.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_trainer_state,
    save_checkpoint,
)
from metaopt.meta.estimators import Estimator, GradientSource, make_estimator
from metaopt.meta.unroll import mean_final_loss, mean_loss, rollout_losses
from metaopt.optimizers import MetaParams, Optimizer
from metaopt.tasks import TaskFamily, TaskMixture, make_task, optimizee_seeds, task_data

MetricsFn = Callable[[int, dict[str, float]], None]
CheckpointFn = Callable[[Path, dict[str, float]], None]  # (checkpoint folder, that meta-step's metrics)
BEST = "best"  # the checkpoint with the lowest validation loss so far


VALIDATION_STREAM = 2**31 - 1  # the mixture stream validation tasks are drawn from; workers use 0, 1, ...
FRESH_VALIDATION_STREAM = 2**32  # validation_draw: fresh draws meta-step k's optimizees from stream 2**32 + k


def training_tasks(config: Config, device: torch.device, data=None, worker: int = 0) -> TaskFamily | TaskMixture:
    """What worker ``worker`` meta-trains on: the config's task, or a mixture of ``train.tasks`` drawn
    from the worker's own stream. ``data``: the task's data (``task_data``), or a list of every mixture
    member's, already loaded."""
    train = config.train
    if train.tasks is None:
        return make_task(config.task, "meta_train", device, data=data)
    return _mixture(config, "meta_train", device, data, worker)


def _mixture(config: Config, half, device: torch.device, data, stream: int) -> TaskMixture:
    tasks = config.train.tasks
    weights = [entry.weight for entry in tasks]
    return TaskMixture([e.task for e in tasks], weights, half, device, data, seed=config.train.seed, stream=stream)


def validation_tasks(config: Config, device: torch.device) -> list[TaskFamily]:
    """The families checkpoints are chosen on: the config's task, or (``train.validation: mixture``)
    ``train.eval_tasks`` tasks drawn from the mixture on the meta-test halves of their data."""
    train = config.train
    if train.validation == "task":
        return [make_task(config.task, "meta_test", device)]
    mixture = _mixture(config, "meta_test", device, None, VALIDATION_STREAM)
    return [mixture.episode_family(episode) for episode in range(train.eval_tasks)]


def training_data(config: Config) -> list | tuple | None:
    """The meta-train data ``training_tasks`` reads, as NumPy arrays (for Ray's object store)."""
    if config.train.tasks is None:
        return task_data(config.task, "meta_train")
    return [task_data(entry.task, "meta_train") for entry in config.train.tasks]


def share_estimator(
    config: Config, tasks: TaskFamily | TaskMixture, optimizer: Optimizer, worker: int = 0, workers: int = 1
) -> Estimator:
    """The estimator of worker ``worker`` of ``workers``: its equal, contiguous share of every
    episode's ``train.batch_size`` meta-train optimizees (all of them for one worker)."""
    train = config.train
    share = train.batch_size // workers

    def seeds(episode: int) -> list[int]:
        every = optimizee_seeds(train.seed, train.batch_size, "meta_train", stream=episode)
        return every[worker * share : (worker + 1) * share]

    return make_estimator(
        train.estimator,
        tasks,
        optimizer,
        seeds=seeds,
        unroll_length=train.unroll,
        episode_length=train.episode_length,
        seed=train.seed + 7919 * worker,
        checkpoint_steps=train.unroll_checkpoint_steps,
        meta_loss=train.meta_loss,
        partial_truncations=train.partial_truncations,
    )


class MetaTrainer:
    """Meta-trains ``config.optimizer`` on ``config.task`` as ``config.train`` says.

    ``gradient_source`` defaults to an in-process estimator over all of ``train.batch_size``
    optimizees; ``metaopt.distributed`` passes a group of Ray RolloutWorkers instead.
    """

    def __init__(self, config: Config, run_dir: Path, gradient_source: GradientSource | None = None):
        config.require("optimizer", "train")
        # Subnormal floats (tiny gradients, second-order terms early in an episode) are tens of times
        # slower on x86 CPUs; flushing them to zero changes nothing measurable in the losses.
        torch.set_flush_denormal(True)
        self.config, self.run_dir = config, Path(run_dir)
        train = config.train
        self.device = resolve_device(config.device)
        self.optimizer = config.optimizer.build()
        # Validation optimizees: meta-test ones from their own seed streams (1, 2, ...), so choosing the best
        # checkpoint never sees the optimizees of the final comparison (stream 0).
        self.validation = [
            (family, family.sample(optimizee_seeds(train.seed, train.eval_runs, "meta_test", stream=1 + index)))
            for index, family in enumerate(validation_tasks(config, self.device))
        ]
        self.meta_params: MetaParams = {
            k: v.to(self.device).requires_grad_(True) for k, v in self.optimizer.init_meta_params(train.seed).items()
        }
        self.meta_optimizer = torch.optim.Adam(list(self.meta_params.values()), lr=train.meta_lr)
        self.estimator = gradient_source or share_estimator(config, training_tasks(config, self.device), self.optimizer)
        self.meta_step = 0
        self.skipped = 0
        self.best_heldout = math.inf
        self.history: list[dict[str, float]] = []

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def meta_gradient_step(self) -> dict[str, float]:
        """One meta-step; a non-finite meta-gradient is skipped and counted, never applied."""
        started = time.perf_counter()
        estimate = self.estimator.estimate({k: v.detach() for k, v in self.meta_params.items()})
        grads = list(estimate.grads.values())
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        applied = math.isfinite(norm) and math.isfinite(estimate.meta_loss)
        if applied:
            scale = min(1.0, self.config.train.grad_clip / (norm + 1e-12)) if self.config.train.grad_clip else 1.0
            for param, grad in zip(self.meta_params.values(), grads):
                param.grad = (grad * scale).to(param.device)
            self.meta_optimizer.step()
            self.meta_optimizer.zero_grad(set_to_none=True)
        else:
            self.skipped += 1
            self.estimator.reset_episode()  # its optimizees have most likely diverged
        self.meta_step += 1
        seconds = time.perf_counter() - started
        return {
            "meta_loss": estimate.meta_loss,
            "grad_norm": norm,
            "skipped_nonfinite": float(self.skipped),
            "optimizee_steps": float(estimate.optimizee_steps),
            "optimizee_steps_per_s": estimate.optimizee_steps / seconds,
            **estimate.stats,
        }

    def heldout_loss(self) -> float:
        """Mean final loss of the current optimizer on the validation optimizees, over runs of the longest
        episode length; with ``validation: mixture``, of each optimizee's final loss over its initial one,
        averaged over the validation tasks. ``validation_metric: mean`` scores the mean loss before each
        update instead, and ``validation_draw: fresh`` draws new optimizees for every validation (OPT-ML's)."""
        train = self.config.train
        meta_params = {k: v.detach() for k, v in self.meta_params.items()}
        relative, scores = train.validation == "mixture", []
        steps = max(train.episode_lengths)
        validation = self.validation
        if train.validation_draw == "fresh":
            seeds = optimizee_seeds(
                train.seed, train.eval_runs, "meta_test", stream=FRESH_VALIDATION_STREAM + self.meta_step
            )
            validation = [(family, family.sample(seeds)) for family, _ in validation]
        for family, optimizees in validation:
            losses = rollout_losses(family, self.optimizer.spanning(steps), meta_params, optimizees, steps)
            losses = losses / losses[:, :1] if relative else losses
            scores.append(mean_final_loss(losses) if train.validation_metric == "final" else mean_loss(losses[:, :-1]))
        return sum(scores) / len(scores)

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoint_dir / BEST

    def train(
        self, show_progress: bool = True, on_metrics: MetricsFn | None = None, on_checkpoint: CheckpointFn | None = None
    ) -> Path:
        """Meta-train until ``train.meta_steps``; return the final checkpoint (``best_checkpoint``
        holds the one with the lowest validation loss). ``on_checkpoint`` sees every periodic one."""
        train = self.config.train
        if self.meta_step == 0 or not self.best_checkpoint.is_dir():
            # The initialisation competes for best too; a run resumed into a new folder (--output, a PBT
            # exploit) starts its own best from where it resumed.
            self.best_heldout = self.heldout_loss()
            self.save(name=BEST)
        bar = tqdm(
            total=train.meta_steps,
            initial=self.meta_step,
            desc="meta-train",
            unit="meta-step",
            disable=not show_progress,
        )
        while self.meta_step < train.meta_steps:
            metrics = self.meta_gradient_step()
            if self.meta_step % train.eval_every == 0 or self.meta_step == train.meta_steps:
                metrics["heldout_loss"] = self.heldout_loss()
                if metrics["heldout_loss"] < self.best_heldout:
                    self.best_heldout = metrics["heldout_loss"]
                    self.save(name=BEST)
            self.history.append({"meta_step": self.meta_step, **metrics})
            if on_metrics:
                on_metrics(self.meta_step, metrics)
            bar.update(1)
            bar.set_postfix(
                meta_loss=f"{metrics['meta_loss']:.4g}",
                steps_per_s=f"{metrics['optimizee_steps_per_s']:.0f}",
                **({"heldout": f"{metrics['heldout_loss']:.4g}"} if "heldout_loss" in metrics else {}),
            )
            if self.meta_step % train.checkpoint_every == 0 or self.meta_step == train.meta_steps:
                checkpoint = self.save()
                if on_checkpoint:
                    on_checkpoint(checkpoint, metrics)
        bar.close()
        found = list_checkpoints(self.checkpoint_dir)
        # empty when this run resumed from a finished run's checkpoint in another folder (a PBT exploit)
        return found[-1] if found else self.save()

    def save(self, name: str | None = None) -> Path:
        """Checkpoint everything needed to continue exactly, and the metrics so far."""
        import pandas as pd  # here, not at the top: Ray workers import this module and never write metrics

        self.run_dir.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(self.history).to_parquet(self.run_dir / "metrics.parquet", index=False)
        return save_checkpoint(
            self.checkpoint_dir,
            self.meta_step,
            self.optimizer,
            self.meta_params,
            trainer_state={
                "meta_step": self.meta_step,
                "skipped": self.skipped,
                "best_heldout": self.best_heldout,
                "meta_optimizer": self.meta_optimizer.state_dict(),
                "estimator": self.estimator.state_dict(),
            },
            extra_spec={
                "task": self.config.task.model_dump(),
                "train": self.config.train.model_dump(),
                **(
                    {"heldout_loss": self.best_heldout, "selected_on": selected_on(self.config)} if name == BEST else {}
                ),
            },
            keep=self.config.train.keep_checkpoints,
            name=name,
        )

    def resume(self, checkpoint: Path) -> None:
        """Continue from ``checkpoint`` (a checkpoint folder, or a run folder: its latest checkpoint)."""
        checkpoint = Path(checkpoint)
        if not (checkpoint / "spec.json").exists():
            found = list_checkpoints(checkpoint / "checkpoints") or list_checkpoints(checkpoint)
            if not found:
                raise CheckpointError(f"no checkpoint to resume under {checkpoint} (expected meta_step_* folders)")
            checkpoint = found[-1]
        _, weights, spec = load_checkpoint(checkpoint)
        expected = self.optimizer.spec()
        if (spec["kind"], spec["hyperparameters"]) != (expected["kind"], expected["hyperparameters"]):
            raise CheckpointError(
                f"checkpoint {checkpoint} holds {spec['kind']} {spec['hyperparameters']}, but the config "
                f"trains {expected['kind']} {expected['hyperparameters']}; resume with the config it was made with"
            )
        state = load_trainer_state(checkpoint)
        with torch.no_grad():
            for name, param in self.meta_params.items():
                param.copy_(weights[name])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        for group in self.meta_optimizer.param_groups:  # the config's rate wins (e.g. PBT changed it)
            group["lr"] = self.config.train.meta_lr
        self.estimator.load_state_dict(to_device(state["estimator"], self.device))
        self.meta_step, self.skipped = int(state["meta_step"]), int(state["skipped"])
        self.best_heldout = float(state["best_heldout"])
        metrics_file = self.run_dir / "metrics.parquet"
        if metrics_file.exists():
            import pandas as pd

            self.history = [
                r for r in pd.read_parquet(metrics_file).to_dict("records") if r["meta_step"] <= self.meta_step
            ]


def selected_on(config: Config) -> list[str]:
    """What chooses a run's best checkpoint, for its spec (``metaopt benchmark`` marks a suite named here): its
    validation tasks, e.g. ``meta_validation:task:quadratic``."""
    train = config.train
    tasks = [config.task] if train.validation == "task" else [entry.task for entry in train.tasks]
    return [f"meta_validation:{train.validation}:{getattr(task, 'factory', task.kind)}" for task in tasks]


def to_device(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device) if value.dtype != torch.uint8 else value  # RNG states stay on CPU
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value
