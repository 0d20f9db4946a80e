"""``metaopt benchmark``: learned optimizers against per-task tuned hand-designed baselines on a suite of tasks.

Every task of a suite runs ``runs`` times, each run with its own meta-test optimizee seed: the seed draws the
model's initialisation and its minibatch stream, so every optimizer sees the same inits and minibatches. A
learned optimizer steps a real ``nn.Module`` through ``metaopt.load_optimizer``, one instance per run, as a
user runs it. The baselines (Adam, AdamW, SGD with momentum over a learning-rate grid, each constant and
cosine-decayed) are per-coordinate, so every configuration and run of a task trains as one batched
``torch.func`` computation; they are tuned once per task and cached. The tuning-free peers (schedule-free
AdamW, Prodigy, AdamW with warm-up and cosine decay) step real modules beside them where a suite names them.

A suite with ``score: validation`` is scored on held-out data instead: ``metaopt.benchmark.validation``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn
from tqdm.auto import tqdm

from metaopt.api import load_optimizer
from metaopt.config import (
    ConfigError,
    ModuleTaskConfig,
    StrictModel,
    apply_overrides,
    read_yaml_mapping,
    repeated,
    validate_model,
)
from metaopt.meta.checkpoint import CheckpointError, load_checkpoint
from metaopt.optimizers.native import cache_dir
from metaopt.tasks import ModuleTask, Optimizees, make_task, optimizee_seeds
from metaopt.tasks.base import hash_uniform_indices
from metaopt.tasks.module import ModuleTaskSpec
from metaopt.tracking.registry import resolve_checkpoint

BASELINE_KINDS = ("adam", "adamw", "sgd_momentum")
FINAL_FRACTION = 0.1  # the final loss averages the training loss over this last fraction of a run's steps
CACHE_FORMAT = 2  # bump when the cached tables' meaning changes (2: final losses summed per window)
PEER_KINDS = ("schedule_free_adamw", "prodigy", "adamw_warmup_cosine")
PEER_CACHE_FORMAT = 1  # the training-loss suite's cached peer curves
WARMUP_FRACTION = 0.05  # warmup_cosine: the linear warm-up's share of a run's steps
SELECTED_MARK = "†"  # a learned optimizer selected on the suite being reported
Schedule = Literal["constant", "cosine", "warmup_cosine"]


class BaselineGrid(StrictModel):
    """The hand-designed optimizers tuned per task: every kind with every learning rate and schedule."""

    kinds: list[Literal["adam", "adamw", "sgd_momentum"]] = Field(
        default_factory=lambda: list(BASELINE_KINDS), min_length=1
    )
    lrs: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0], min_length=1
    )
    schedules: list[Schedule] = Field(default_factory=lambda: ["constant", "cosine"], min_length=1)
    weight_decay: float = Field(0.01, ge=0, description="adamw's decoupled weight decay")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd_momentum's momentum")


class SuiteTask(StrictModel):
    """One task of a suite: a module task (``factory`` and ``batch_size``) trained for ``steps`` steps."""

    name: str = Field(pattern=r"^[\w.-]+$")
    task: ModuleTaskConfig
    steps: int = Field(ge=1)


class Peers(StrictModel):
    """The tuning-free peers, each at its documented defaults: ``schedule_free_adamw`` (``AdamWScheduleFree``),
    ``prodigy`` (``Prodigy(lr=1.0)`` with a cosine decay over the run), ``adamw_warmup_cosine`` (AdamW at
    ``adamw_lr`` with a linear warm-up and a cosine decay)."""

    kinds: list[Literal["schedule_free_adamw", "prodigy", "adamw_warmup_cosine"]] | Literal["all"] | None = Field(
        None, description="default: all of them on a validation suite, none on a training-loss suite"
    )
    adamw_lr: float = Field(1e-3, gt=0, description="adamw_warmup_cosine's peak learning rate")
    bn_batches: int = Field(
        8, ge=1, description="schedule-free's BatchNorm rule: training batches that recompute the statistics"
    )


class Suite(StrictModel):
    """A benchmark suite: its tasks, the runs of each, the baseline grid, the peers, and what is scored."""

    tasks: list[SuiteTask] = Field(min_length=1)
    runs: int = Field(5, ge=1, description="runs per task and optimizer, each with its own optimizee seed")
    seed: int = Field(0, ge=0)
    baselines: BaselineGrid = Field(default_factory=BaselineGrid)
    speedup_cap: int = Field(
        4, ge=1, description="the best baseline reruns for up to this many times a task's steps for the speedup"
    )
    output_dir: str = "runs/benchmark"
    score: Literal["training", "validation"] = Field(
        "training", description="training: the final training loss; validation: the held-out validation loss"
    )
    eval_every: int = Field(10, ge=1, description="score: validation evaluates every this many steps and at the last")
    eval_batch_size: int = Field(1024, ge=1, description="examples per forward pass when evaluating")
    warmup_fraction: float = Field(WARMUP_FRACTION, gt=0, lt=1, description="warmup_cosine's warm-up share")
    peers: Peers = Field(default_factory=Peers)

    @model_validator(mode="after")
    def _validation_defaults(self) -> Suite:
        """A validation suite tunes AdamW over constant and warm-up + cosine unless it says otherwise."""
        if self.score == "validation":
            if "kinds" not in self.baselines.model_fields_set:
                self.baselines.kinds = ["adamw"]
            if "schedules" not in self.baselines.model_fields_set:
                self.baselines.schedules = ["constant", "warmup_cosine"]
            if "adamw" not in self.baselines.kinds:
                raise ValueError("score: validation compares with the tuned AdamW: baselines.kinds must hold adamw")
        return self

    @property
    def peer_kinds(self) -> list[str]:
        """The peers that run: ``peers.kinds``, or its default for the suite's ``score``."""
        kinds = self.peers.kinds
        if kinds is None:
            kinds = "all" if self.score == "validation" else []
        return list(PEER_KINDS) if kinds == "all" else list(kinds)

    @field_validator("tasks")
    @classmethod
    def _unique_names(cls, tasks: list[SuiteTask]) -> list[SuiteTask]:
        duplicated = repeated([task.name for task in tasks])
        if duplicated:
            raise ValueError(f"task names must be unique ({', '.join(duplicated)})")
        return tasks


def load_suite(path: str | Path, overrides: Sequence[str] = ()) -> Suite:
    """Read, override and validate a suite file (its task factories imported); any problem raises
    ``ConfigError`` naming the field."""
    data = apply_overrides(read_yaml_mapping(Path(path), "suite file", "tasks, runs, seed, baselines"), list(overrides))
    return validate_model(Suite, data, f"invalid suite {path}")


@dataclass(frozen=True)
class Baseline:
    """One hand-designed configuration: a kind, a learning rate and a schedule."""

    kind: str
    lr: float
    schedule: str

    @property
    def name(self) -> str:
        return f"{self.kind} lr={self.lr:g} {self.schedule}"


def grid_configurations(grid: BaselineGrid) -> list[Baseline]:
    """Every configuration of the grid."""
    return [Baseline(kind, lr, schedule) for kind in grid.kinds for lr in grid.lrs for schedule in grid.schedules]


def lr_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, steps: int, warmup_fraction: float = WARMUP_FRACTION
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The per-step schedule of ``optimizer`` over ``steps`` updates: none (constant), ``CosineAnnealingLR``
    to 0 (cosine), or a linear warm-up over ``warmup_fraction`` of the steps, then a cosine decay to 0 over
    the rest (warmup_cosine)."""
    if schedule == "constant":
        return None
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    warmup = max(1, round(warmup_fraction * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def torch_optimizer(baseline: Baseline, params: list[Tensor], grid: BaselineGrid) -> torch.optim.Optimizer:
    if baseline.kind == "adam":
        return torch.optim.Adam(params, lr=baseline.lr)
    if baseline.kind == "adamw":
        return torch.optim.AdamW(params, lr=baseline.lr, weight_decay=grid.weight_decay)
    return torch.optim.SGD(params, lr=baseline.lr, momentum=grid.momentum)


def run_baselines(
    task: ModuleTask,
    seeds: Sequence[int],
    baselines: Sequence[Baseline],
    grid: BaselineGrid,
    steps: int,
    progress: tqdm | None = None,
    warmup_fraction: float = WARMUP_FRACTION,
) -> Tensor:
    """Training losses ``[baselines, runs, steps]`` (float64; the loss at step t is before update t).

    Each configuration keeps its ``[runs, n]`` parameters in one leaf with its own ``torch.optim`` optimizer
    (and ``lr_scheduler`` over ``steps``); as the optimizers are per-coordinate, that is each run's own
    optimizer. All configurations and runs go through one batched forward and backward per step.
    """
    optimizees = task.sample(seeds)
    leaves = [optimizees.params.clone().requires_grad_(True) for _ in baselines]
    optimizers = [torch_optimizer(baseline, [leaf], grid) for baseline, leaf in zip(baselines, leaves)]
    schedulers = [
        scheduler
        for baseline, optimizer in zip(baselines, optimizers)
        if (scheduler := lr_scheduler(optimizer, baseline.schedule, steps, warmup_fraction)) is not None
    ]
    everyone = Optimizees(seeds=optimizees.seeds.repeat(len(baselines)), params=optimizees.params)
    losses = torch.empty(len(baselines), len(seeds), steps, dtype=torch.float64)
    for step in range(steps):
        loss = task.batched_loss(torch.cat(leaves), everyone, step)
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss.sum().backward()
        for optimizer in optimizers:
            optimizer.step()
        for scheduler in schedulers:
            scheduler.step()
        losses[:, :, step] = loss.detach().view(len(baselines), len(seeds))
        if progress is not None:
            progress.update(len(baselines) * len(seeds))
    return losses


class Stepped:
    """An optimizer and its per-step learning-rate scheduler, stepped together, as ``train_modules`` steps an
    optimizer; ``train()`` and ``eval()`` switch a schedule-free optimizer's parameters between the point it
    takes gradients at and the average it is evaluated at (no-ops for the others)."""

    def __init__(self, optimizer, scheduler=None, schedule_free: bool = False):
        self.optimizer, self.scheduler, self.schedule_free = optimizer, scheduler, schedule_free
        self.train()  # schedule-free optimizers start in eval mode and refuse to step there

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def step(self) -> None:
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()

    def train(self) -> None:
        if self.schedule_free:
            self.optimizer.train()

    def eval(self) -> None:
        if self.schedule_free:
            self.optimizer.eval()


@dataclass(frozen=True)
class Peer:
    """A tuning-free peer at its defaults: its kind (its name in the report), learning rate and schedule."""

    kind: str
    lr: float
    schedule: str

    @property
    def name(self) -> str:
        return self.kind


def peers(suite: Suite) -> list[Peer]:
    """The suite's peers with the learning rate and schedule each runs with."""
    settings = {
        "schedule_free_adamw": (0.0025, "constant"),  # AdamWScheduleFree's default lr; no schedule needed
        "prodigy": (1.0, "cosine"),  # Prodigy's lr multiplies its estimated step size
        "adamw_warmup_cosine": (suite.peers.adamw_lr, "warmup_cosine"),
    }
    return [Peer(kind, *settings[kind]) for kind in suite.peer_kinds]


def make_peer(peer: Peer, params: list[nn.Parameter], steps: int, suite: Suite) -> Stepped:
    """``peer``'s optimizer over ``params`` for a run of ``steps`` updates, as its README recommends."""
    if peer.kind == "schedule_free_adamw":
        from schedulefree import AdamWScheduleFree

        return Stepped(AdamWScheduleFree(params), schedule_free=True)
    if peer.kind == "prodigy":
        from prodigyopt import Prodigy

        optimizer = Prodigy(params, lr=peer.lr)
    else:
        optimizer = torch.optim.AdamW(params, lr=peer.lr, weight_decay=suite.baselines.weight_decay)
    return Stepped(optimizer, lr_scheduler(optimizer, peer.schedule, steps, suite.warmup_fraction))


@dataclass
class Learned:
    """A learned optimizer under test: its name in the report and its resolved checkpoint folder."""

    name: str
    source: str
    folder: Path
    has_schedule: bool  # a learned step schedule: load it with horizon = the run's steps
    selected_on: tuple[str, ...] = ()  # its spec's selected_on: the task sets (suites) that selected it

    def selected_on_suite(self, suite_name: str) -> bool:
        """Whether this optimizer was selected on the suite being reported (its results there are optimistic)."""
        return bool(suite_name) and suite_name in self.selected_on


def resolve_learned(text: str, tracking_uri: str | None = None) -> Learned:
    """``--optimizer``'s ``SOURCE`` or ``NAME=SOURCE`` (``pretrained:NAME``, a checkpoint folder, ``models:/...``,
    ``runs:/...``), resolved to a local checkpoint once, so every run loads the same weights."""
    name, separator, source = text.partition("=")
    if not separator or ":/" in name or "/" in name:
        name, source = text, text
    try:
        folder = resolve_checkpoint(source, tracking_uri)
        optimizer, _, spec = load_checkpoint(folder)
    except (CheckpointError, LookupError) as error:
        raise ConfigError(f"--optimizer {source}: {error}") from None
    selected_on = spec.get("selected_on", [])
    selected_on = [selected_on] if isinstance(selected_on, str) else selected_on
    return Learned(name, source, folder, optimizer.horizon is not None, tuple(map(str, selected_on)))


def run_learned(
    task: ModuleTask, seeds: Sequence[int], learned: Learned, steps: int, progress: tqdm | None = None
) -> Tensor:
    """Training losses ``[runs, steps]`` of ``learned`` (loaded with ``horizon`` = ``steps`` where it has a
    schedule) on each run's own ``nn.Module``, as ``train_modules`` runs them."""
    return train_modules(task, seeds, steps, lambda params: learned_optimizer(learned, params, steps), progress)


def learned_optimizer(learned: Learned, params: list[nn.Parameter], steps: int) -> torch.optim.Optimizer:
    """``learned`` over ``params`` as a user loads it, with ``horizon`` = ``steps`` where it has a schedule."""
    return load_optimizer(learned.folder, params, **({"horizon": steps} if learned.has_schedule else {}))


def peer_rows(task: ModuleTask, seeds: Sequence[int], suite: Suite, steps: int, progress: tqdm | None) -> dict:
    """Training losses ``[runs, steps]`` of each of the suite's peers on each run's own ``nn.Module``."""
    return {
        peer: train_modules(
            task, seeds, steps, lambda params, peer=peer: make_peer(peer, params, steps, suite), progress
        )
        for peer in peers(suite)
    }


@dataclass
class ModuleData:
    """The training data a run steps on: a task's spec, its training examples and its minibatch size (a
    validation suite trains on all of ``spec.inputs``; ``ModuleTask`` holds its meta-test half)."""

    definition: ModuleTaskSpec
    inputs: Tensor
    targets: Tensor
    batch_size: int


Probe = Callable[[int, int, list[Tensor], nn.Module], None]  # (run, step, parameters before the step, model)
Evaluate = Callable[[int, int, nn.Module, object], None]  # (run, updates so far, model, optimizer)


def minibatch_indices(seeds: Sequence[int], steps: Sequence[int], batch_size: int, examples: int) -> Tensor:
    """``[runs, len(steps), batch_size]``: run r's minibatch at step t is a hash of (seed_r, t), as the
    batched baselines draw it."""
    seed_tensor = torch.tensor(list(seeds), dtype=torch.int64)
    return torch.stack([hash_uniform_indices(seed_tensor, t, batch_size, examples) for t in steps], 1)


def seeded_model(spec: ModuleTaskSpec, seed: int) -> nn.Module:
    """Run ``seed``'s model: built under ``torch.manual_seed(seed)`` as ``ModuleTask.sample`` draws it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return spec.model()


def train_modules(
    task: ModuleTask | ModuleData,
    seeds: Sequence[int],
    steps: int,
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer | Stepped],
    progress: tqdm | None = None,
    probe: Probe | None = None,
    evaluate: Evaluate | None = None,
) -> Tensor:
    """Training losses ``[runs, steps]`` of ``make_optimizer(params)`` stepping each run's own ``nn.Module``,
    built under ``torch.manual_seed(seed)`` as ``ModuleTask.sample`` draws it, on the same minibatches as the
    baselines. A run stops at its first non-finite loss, which fills the rest of its curve. ``probe`` sees
    every step's parameters before it and the model after it; ``evaluate`` sees the model and optimizer
    before the first update (0) and after every update (their count)."""
    spec = task.definition
    indices = minibatch_indices(seeds, range(steps), task.batch_size, len(task.targets))
    losses = torch.empty(len(seeds), steps, dtype=torch.float64)
    for run, seed in enumerate(seeds):
        model = seeded_model(spec, seed)
        model.train()
        optimizer = make_optimizer(list(model.parameters()))
        if evaluate:
            evaluate(run, 0, model, optimizer)
        for step in range(steps):
            batch = indices[run, step]
            loss = spec.loss(model(task.inputs[batch]), task.targets[batch])
            losses[run, step] = loss.item()
            if not math.isfinite(losses[run, step]):
                losses[run, step:] = losses[run, step]
                if progress is not None:
                    progress.update(steps - step)
                break
            optimizer.zero_grad()
            loss.backward()
            before = [param.detach().clone() for param in model.parameters()] if probe else []
            optimizer.step()
            if probe:
                probe(run, step, before, model)
            if evaluate:
                evaluate(run, step + 1, model, optimizer)
            if progress is not None:
                progress.update(1)
    return losses


def final_window(steps: int) -> int:
    """The trailing window of the final loss: the last ``FINAL_FRACTION`` of the steps, at least one."""
    return max(1, round(FINAL_FRACTION * steps))


def smoothed(curve: np.ndarray, window: int) -> np.ndarray:
    """The trailing mean of ``curve`` over ``window`` steps (over the steps so far at the start), each window
    summed on its own: differences of a running sum lose a small loss after a spike of 1e17 to rounding."""
    values = np.asarray(curve, dtype=np.float64)
    windows = np.lib.stride_tricks.sliding_window_view(np.concatenate([np.zeros(window - 1), values]), window)
    return windows.sum(axis=1) / np.minimum(np.arange(1, len(values) + 1), window)


def final_loss(losses: Tensor, window: int) -> float:
    """Mean over runs of each run's mean loss over the last ``window`` steps; inf if any run diverged
    (a non-finite loss anywhere)."""
    if not torch.isfinite(losses).all():
        return math.inf
    return float(smoothed(losses.mean(0).numpy(), window)[-1])


def diverged_runs(losses: Tensor, window: int) -> int:
    """Runs whose loss became non-finite or whose final loss is above their initial loss."""
    finite = torch.isfinite(losses).all(-1)
    ends_higher = losses[:, -window:].mean(-1) > losses[:, 0]
    return int((~finite | ends_higher).sum())


def speedup(target: float, tuned: np.ndarray, longer: np.ndarray, steps: int, cap: int) -> tuple[float, bool]:
    """(steps the best baseline needs to reach ``target``) / ``steps``, and whether it never did (then the
    cap). ``tuned``: its smoothed mean curve over the run's ``steps``; ``longer``: the same configuration
    rerun over ``cap`` × ``steps`` with its schedule stretched, looked at where ``tuned`` never reaches it."""
    for curve in (tuned, longer):
        reached = np.flatnonzero(curve <= target)
        if reached.size:
            return (int(reached[0]) + 1) / steps, False
    return float(cap), True


@dataclass
class TunedBaselines:
    """A task's tuned baselines: every configuration's final loss, each kind's best configuration with its
    losses ``[runs, steps]``, and the best configuration's losses rerun over ``cap`` × ``steps``."""

    scores: pd.DataFrame  # kind, lr, schedule, final_loss: one row per configuration
    best_of_kind: dict[str, tuple[Baseline, Tensor]]
    best: Baseline
    longer: Tensor


def _best(scores: pd.DataFrame) -> Baseline:
    """The configuration with the lowest final loss (the first of equals)."""
    row = scores.iloc[int(np.argmin(scores.final_loss.to_numpy()))]
    return Baseline(row.kind, float(row.lr), row.schedule)


def tune_baselines(
    task: ModuleTask, seeds: Sequence[int], suite: Suite, steps: int, progress: tqdm | None = None
) -> TunedBaselines:
    """Run the whole grid on ``task``, keep each kind's best configuration, and rerun the overall best
    over ``suite.speedup_cap`` × ``steps`` with its schedule stretched."""
    configurations = grid_configurations(suite.baselines)
    losses = run_baselines(task, seeds, configurations, suite.baselines, steps, progress)
    window = final_window(steps)
    scores = pd.DataFrame(
        {
            "kind": [c.kind for c in configurations],
            "lr": [c.lr for c in configurations],
            "schedule": [c.schedule for c in configurations],
            "final_loss": [final_loss(curves, window) for curves in losses],
        }
    )
    best_of_kind = {}
    for kind in suite.baselines.kinds:
        best = _best(scores[scores.kind == kind])
        best_of_kind[kind] = (best, losses[configurations.index(best)])
    best = _best(scores)
    (longer,) = run_baselines(task, seeds, [best], suite.baselines, suite.speedup_cap * steps, progress)
    return TunedBaselines(scores, best_of_kind, best, longer)


def cache_key(entry: SuiteTask, suite: Suite, task: ModuleTask, seeds: Sequence[int]) -> str:
    """A hash of what a task's tuned baselines depend on: its config, data and initial parameters, its
    steps, and the suite's runs, seed, grid and speedup cap."""
    settings = {
        "format": CACHE_FORMAT,
        "task": entry.task.model_dump(mode="json"),
        "steps": entry.steps,
        "runs": suite.runs,
        "seed": suite.seed,
        "baselines": suite.baselines.model_dump(mode="json"),
        "speedup_cap": suite.speedup_cap,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for tensor in (task.inputs, task.targets, task.sample(seeds).params):
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def peer_cache_key(baselines_key: str, suite: Suite) -> str:
    """A hash of what a training-loss suite's peer curves depend on: the task's baselines key and the peers."""
    settings = {
        "format": PEER_CACHE_FORMAT,
        "baselines": baselines_key,
        "peers": [peer.__dict__ for peer in peers(suite)],
        "weight_decay": suite.baselines.weight_decay,
        "warmup_fraction": suite.warmup_fraction,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def save_curves(folder: Path, tables: dict[str, pd.DataFrame]) -> None:
    """Write each table as ``folder/<name>.parquet``, atomically."""
    partial = folder.with_name(f".partial-{folder.name}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name, table in tables.items():
        table.to_parquet(partial / f"{name}.parquet", index=False)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)


def curve_tensor(curves: pd.DataFrame, column: str = "loss") -> Tensor:
    """``[runs, steps]`` float64 from ``curve_rows``' rows of one curve."""
    rows = curves.sort_values(["run", "step"])
    return torch.tensor(rows[column].to_numpy(), dtype=torch.float64).view(rows.run.nunique(), -1)


def cached_peers(
    folder: Path, task: ModuleTask, seeds: Sequence[int], suite: Suite, steps: int, progress: tqdm | None
) -> dict:
    """The peers' training losses on ``task``: read from ``folder`` or run and saved there."""
    if folder.is_dir():
        curves = pd.read_parquet(folder / "curves.parquet")
        return {peer: curve_tensor(curves[curves.curve == peer.kind]) for peer in peers(suite)}
    runs = peer_rows(task, seeds, suite, steps, progress)
    save_curves(folder, {"curves": pd.concat([curve_rows(v, {"curve": k.kind}) for k, v in runs.items()])})
    return runs


def save_tuned(folder: Path, tuned: TunedBaselines) -> None:
    """Write ``scores.parquet`` and ``curves.parquet`` (each kind's best and the longer rerun) into
    ``folder``, atomically."""
    partial = folder.with_name(f".partial-{folder.name}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    tuned.scores.to_parquet(partial / "scores.parquet", index=False)
    named = [(kind, losses) for kind, (_, losses) in tuned.best_of_kind.items()] + [("longer", tuned.longer)]
    curves = pd.concat([curve_rows(losses, {"curve": name}) for name, losses in named], ignore_index=True)
    curves.to_parquet(partial / "curves.parquet", index=False)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)


def load_tuned(folder: Path, kinds: Sequence[str]) -> TunedBaselines:
    """The tuned baselines saved in ``folder``."""
    scores = pd.read_parquet(folder / "scores.parquet")
    curves = pd.read_parquet(folder / "curves.parquet")

    def losses(name: str) -> Tensor:
        return curve_tensor(curves[curves.curve == name])

    best_of_kind = {kind: (_best(scores[scores.kind == kind]), losses(kind)) for kind in kinds}
    return TunedBaselines(scores, best_of_kind, _best(scores), losses("longer"))


def curve_rows(losses: Tensor, columns: dict) -> pd.DataFrame:
    """One row per (run, step) of ``losses`` [runs, steps], with constant ``columns``."""
    runs, steps = losses.shape
    return pd.DataFrame(
        {
            **columns,
            "run": np.repeat(np.arange(runs), steps),
            "step": np.tile(np.arange(steps), runs),
            "loss": losses.reshape(-1).numpy(),
        }
    )


def result_row(
    entry: SuiteTask,
    name: str,
    source: str | Baseline | Peer,
    losses: Tensor,
    tuned: TunedBaselines,
    cap: int,
    selected: bool = False,
) -> dict:
    """One row of results.parquet: the ``losses`` [runs, steps] on ``entry`` of optimizer ``name`` (a learned
    optimizer's ``source``, a tuned ``Baseline`` or a ``Peer``) against the task's best baseline."""
    baseline = source if isinstance(source, Baseline | Peer) else None
    window = final_window(entry.steps)
    best_losses = tuned.best_of_kind[tuned.best.kind][1]
    best_final, final = final_loss(best_losses, window), final_loss(losses, window)
    ratio, speed, capped = math.nan, math.nan, False
    if math.isfinite(best_final):
        ratio = final / best_final if best_final else math.nan
        speed, capped = speedup(
            final,
            smoothed(best_losses.mean(0).numpy(), window),
            smoothed(tuned.longer.mean(0).numpy(), window),
            entry.steps,
            cap,
        )
    diverged = diverged_runs(losses, window)
    return {
        "task": entry.name,
        "optimizer": name,
        "learned": baseline is None,
        "peer": isinstance(source, Peer),
        "source": "" if baseline else source,
        "selected_on_this_suite": selected,
        "steps": entry.steps,
        "runs": len(losses),
        "initial_loss": float(losses[:, 0].mean()),
        "final_loss": final,
        "loss_ratio": ratio,
        "speedup": speed,
        "speedup_capped": capped,
        "diverged": diverged > 0,
        "diverged_runs": diverged,
        "lr": baseline.lr if baseline else math.nan,
        "schedule": baseline.schedule if baseline else "",
        "baseline": tuned.best.kind,
        "baseline_lr": tuned.best.lr,
        "baseline_schedule": tuned.best.schedule,
        "baseline_final_loss": best_final,
    }


def default_output_dir(suite: Suite, name: str) -> Path:
    """``<suite.output_dir>/<name>-<timestamp>``."""
    return Path(suite.output_dir) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_benchmark(
    suite: Suite,
    learned: Sequence[Learned],
    output_dir: Path,
    title: str,
    cache: Path | None = None,
    show_progress: bool = True,
    threads: int = 1,
    suite_name: str = "",
) -> str:
    """Run every task of ``suite`` with each ``learned`` optimizer, the tuned baselines and the peers (from
    ``cache`` where they are); write results.parquet, curves.parquet, results.md and speedup.png (a
    validation suite: validation_curves.png) into ``output_dir`` and return the report. Learned optimizers
    whose spec says they were selected on ``suite_name`` are marked. Torch runs on ``threads`` threads."""
    names = [optimizer.name for optimizer in learned]
    clashes = sorted(set(repeated(names)) | (set(names) & (set(BASELINE_KINDS) | set(PEER_KINDS))))
    if clashes:
        raise ConfigError(
            f"--optimizer names must be unique and differ from the baselines' ({', '.join(clashes)}); "
            f"taken: {', '.join(BASELINE_KINDS + PEER_KINDS)}"
        )
    if threads < 1:
        raise ConfigError(f"--threads must be at least 1, not {threads}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if suite.score == "validation":
            from metaopt.benchmark import validation  # it builds on this module

            results, curves = validation.run_suite(
                suite, learned, cache or cache_dir("benchmark"), show_progress, suite_name
            )
        else:
            results, curves = _run_suite(suite, learned, cache or cache_dir("benchmark"), show_progress, suite_name)
    finally:
        torch.set_num_threads(previous_threads)
    if suite.score == "validation":
        return validation.write_report(results, curves, output_dir, title)
    return write_report(results, curves, output_dir, title)


def _run_suite(
    suite: Suite, learned: Sequence[Learned], cache: Path, show_progress: bool, suite_name: str = ""
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The results and curves of every task and optimizer, the baselines tuned or read from ``cache``."""
    seeds = optimizee_seeds(suite.seed, suite.runs, "meta_test")
    tasks = [make_task(entry.task, "meta_test") for entry in suite.tasks]
    folders = [
        cache / f"{entry.name}-{cache_key(entry, suite, task, seeds)}" for entry, task in zip(suite.tasks, tasks)
    ]
    peer_folders = [
        folder.with_name(f"{entry.name}-peers-{peer_cache_key(folder.name, suite)}")
        for entry, folder in zip(suite.tasks, folders)
    ]
    configurations = len(grid_configurations(suite.baselines))
    total = sum(
        suite.runs
        * entry.steps
        * (
            len(learned)
            + (0 if folder.is_dir() else configurations + suite.speedup_cap)
            + (0 if peer_folder.is_dir() else len(suite.peer_kinds))
        )
        for entry, folder, peer_folder in zip(suite.tasks, folders, peer_folders)
    )
    results, curves = [], []
    with tqdm(total=total, desc="benchmark", unit="step", unit_scale=True, disable=not show_progress) as progress:
        for entry, task, folder, peer_folder in zip(suite.tasks, tasks, folders, peer_folders):
            if folder.is_dir():
                tuned = load_tuned(folder, suite.baselines.kinds)
                tqdm.write(f"{entry.name}: baselines cached ({folder})")
            else:
                progress.set_postfix_str(f"{entry.name}: {configurations} baselines")
                started = time.perf_counter()
                tuned = tune_baselines(task, seeds, suite, entry.steps, progress)
                save_tuned(folder, tuned)
                tqdm.write(
                    f"{entry.name}: tuned {configurations} baselines in {time.perf_counter() - started:.0f} s, "
                    f"best {tuned.best.name}; cached in {folder}"
                )
            runs = [(kind, baseline, losses, False) for kind, (baseline, losses) in tuned.best_of_kind.items()]
            if suite.peer_kinds:
                progress.set_postfix_str(f"{entry.name}: peers")
                found = peer_folder.is_dir()
                ran = cached_peers(peer_folder, task, seeds, suite, entry.steps, progress)
                tqdm.write(f"{entry.name}: peers {'cached' if found else 'ran; cached in'} ({peer_folder})")
                runs += [(peer.name, peer, losses, False) for peer, losses in ran.items()]
            for optimizer in learned:
                progress.set_postfix_str(f"{entry.name}: {optimizer.name}")
                losses = run_learned(task, seeds, optimizer, entry.steps, progress)
                runs.append((optimizer.name, optimizer.source, losses, optimizer.selected_on_suite(suite_name)))
            for name, source, losses, selected in runs:
                results.append(result_row(entry, name, source, losses, tuned, suite.speedup_cap, selected))
                curves.append(curve_rows(losses, {"task": entry.name, "optimizer": name}))
    return pd.DataFrame(results), pd.concat(curves, ignore_index=True)


def write_report(results: pd.DataFrame, curves: pd.DataFrame, output_dir: Path, title: str) -> str:
    """Write results.parquet, curves.parquet, results.md and speedup.png; return the Markdown report."""
    return save_report(results, curves, output_dir, markdown_report(results, title), speedup_figure(results, title))


def save_report(
    results: pd.DataFrame, curves: pd.DataFrame, output_dir: Path, report: str, figure, plot: str = "speedup.png"
) -> str:
    """Write ``results`` and ``curves`` as Parquet, ``report`` as results.md and ``figure`` as ``plot``; return
    ``report``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    results.to_parquet(output_dir / "results.parquet", index=False)
    curves.to_parquet(output_dir / "curves.parquet", index=False)
    (output_dir / "results.md").write_text(report)
    figure.savefig(output_dir / plot, dpi=120)
    return report


def markdown_report(results: pd.DataFrame, title: str) -> str:
    """A table of every task and optimizer, then per learned optimizer its wins, median speedup and divergences."""
    lines = [
        f"# {title}",
        "",
        f"Final loss: mean over runs of the mean training loss over the last {FINAL_FRACTION:.0%} of the steps. "
        "Loss ratio: final loss / the best tuned baseline's. Speedup: steps the best tuned baseline needs to "
        "reach the final loss / the run's steps (≥: not reached within the cap).",
        "",
        "| task | steps | optimizer | final loss | loss ratio | speedup | diverged runs |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results.itertuples():
        name = row.optimizer if row.learned else f"{row.optimizer} (lr {row.lr:g}, {row.schedule})"
        if not row.learned and row.optimizer == row.baseline:
            name = f"**{name}**"
        name += SELECTED_MARK if row.selected_on_this_suite else ""
        speed = f"{'≥ ' if row.speedup_capped else ''}{row.speedup:.2f}"
        lines.append(
            f"| {row.task} | {row.steps} | {name} | {row.final_loss:.4g} | {row.loss_ratio:.3g} | {speed} | "
            f"{row.diverged_runs}/{row.runs} |"
        )
    learned = results[results.learned]
    if len(learned):
        tasks = results.task.nunique()
        lines += [
            "",
            "| learned optimizer | wins (final loss below the best baseline's) | median speedup | diverged on |",
            "|---|---|---|---|",
        ]
        for name, rows in learned.groupby("optimizer", sort=False):
            wins, diverged = int((rows.final_loss < rows.baseline_final_loss).sum()), int(rows.diverged.sum())
            lines.append(f"| {name} | {wins}/{tasks} | {np.nanmedian(rows.speedup):.2f} | {diverged}/{tasks} tasks |")
    return "\n".join(lines + selection_footnote(results)) + "\n"


def selection_footnote(results: pd.DataFrame) -> list[str]:
    """The footnote of ``SELECTED_MARK``, where a row has it."""
    if not results.selected_on_this_suite.any():
        return []
    return [
        "",
        f"{SELECTED_MARK} selected on this suite (its spec's `selected_on`): its results here are optimistic, "
        "not held out.",
    ]


def speedup_figure(results: pd.DataFrame, title: str):
    """Grouped bars from 1 to each optimizer's speedup per task, on a log scale (at least 0.5 to 2) labelled at 1, 2
    and 5 per decade;
    a dot at each bar's end (a speedup of exactly 1 has no bar); hatched where capped."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    tasks = list(dict.fromkeys(results.task))
    optimizers = list(dict.fromkeys(results.optimizer))
    width = 0.8 / len(optimizers)
    figure = Figure(figsize=(max(6.0, 1.2 * len(tasks)), 4.5))
    axes = figure.subplots()
    capped = []
    for index, name in enumerate(optimizers):
        rows = results[results.optimizer == name].set_index("task").reindex(tasks)
        positions = np.arange(len(tasks)) + (index - (len(optimizers) - 1) / 2) * width
        speedups = rows.speedup.to_numpy(dtype=float)
        bars = axes.bar(positions, speedups - 1, width, bottom=1, label=name)
        axes.scatter(positions, speedups, s=12, color=bars.patches[0].get_facecolor(), zorder=3)
        capped += [bar for bar, cap in zip(bars, rows.speedup_capped.to_numpy(dtype=bool)) if cap]
    axes.legend(fontsize="small")  # before the hatches, so the legend's patches have none
    for bar in capped:
        bar.set_hatch("//")
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_yscale("log")
    low, high = axes.get_ylim()
    axes.set_ylim(min(low, 0.5), max(high, 2.0))  # at least 0.5 to 2: three labelled ticks
    axes.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axes.yaxis.set_minor_formatter(NullFormatter())
    axes.set_xticks(np.arange(len(tasks)), tasks, rotation=30, ha="right")
    axes.set_ylabel("speedup over the best baseline")
    axes.set_title(title + ("; hatched: capped, a lower bound" if capped else ""))
    axes.grid(True, axis="y", which="major", alpha=0.3)
    figure.tight_layout()
    return figure
