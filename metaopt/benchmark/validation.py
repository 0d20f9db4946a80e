"""``metaopt benchmark`` on a suite with ``score: validation``: every optimizer trains a real ``nn.Module`` on a
task's training data and is scored on its held-out validation data.

Each run's model is built under the run's optimizee seed and steps on the minibatch stream hashed from it
(``metaopt.benchmark``'s seeding and minibatches), so every optimizer — the tuned AdamW, the peers and the
learned optimizers — starts from the same initialisation and sees the same minibatches. The model trains in
``train()`` mode on all of ``spec.inputs`` and is evaluated in ``eval()`` mode on ``spec.validation_inputs``
before the first update, every ``eval_every`` updates and after the last. AdamW is tuned per task over the
suite's learning rates and schedules by final validation loss; it and the peers are cached per task, so a
learned optimizer alone reruns.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from metaopt.benchmark import (
    SELECTED_MARK,
    Baseline,
    Learned,
    ModuleData,
    Peer,
    Stepped,
    Suite,
    SuiteTask,
    grid_configurations,
    learned_optimizer,
    lr_scheduler,
    make_peer,
    minibatch_indices,
    peers,
    save_curves,
    save_report,
    seeded_model,
    selection_footnote,
    torch_optimizer,
    train_modules,
)
from metaopt.config import ConfigError
from metaopt.tasks import optimizee_seeds
from metaopt.tasks.module import ModuleTaskSpec, call_factory

CACHE_FORMAT = 1  # bump when the cached validation tables' meaning changes
BN_STREAM = 2**24  # schedule-free's BatchNorm rule draws its training batches at steps BN_STREAM + i (past any run)


def evaluation_steps(steps: int, eval_every: int) -> np.ndarray:
    """The update counts a run is evaluated after: 0, ``eval_every``, 2 ``eval_every``, ... and ``steps``."""
    return np.unique(np.append(np.arange(0, steps, eval_every), steps))


@dataclass
class Curves:
    """One optimizer's runs on a task: training losses ``[runs, steps]`` (before each update) and the
    validation loss and metric ``[runs, evaluations]`` after ``evaluation_steps`` updates (nan after a run
    diverged; the metric nan where the task has none)."""

    train: Tensor
    validation: Tensor
    metric: Tensor

    def diverged(self) -> Tensor:
        """Per run: a non-finite training or validation loss, or a final validation loss above the initial."""
        finite = torch.isfinite(self.train).all(-1) & torch.isfinite(self.validation).all(-1)
        return ~finite | (self.validation[:, -1] > self.validation[:, 0])

    def final_validation_loss(self) -> float:
        """Mean over runs of the validation loss after the last update; inf if any run's loss became non-finite."""
        if not (torch.isfinite(self.train).all() and torch.isfinite(self.validation).all()):
            return math.inf
        return float(self.validation[:, -1].mean())

    def final_metric(self) -> float:
        """Mean over runs of the metric after the last update (nan where a run diverged or there is none)."""
        return float(self.metric[:, -1].mean())


def validation_data(entry: SuiteTask) -> ModuleTaskSpec:
    """``entry``'s spec, which must hold validation data."""
    spec = call_factory(entry.task.factory)
    if spec.validation_inputs is None or spec.validation_targets is None:
        raise ConfigError(
            f"task {entry.name}: score: validation needs held-out data, but {entry.task.factory} returns a "
            "ModuleTaskSpec without validation_inputs and validation_targets"
        )
    if len(spec.validation_inputs) != len(spec.validation_targets) or not len(spec.validation_inputs):
        raise ConfigError(f"task {entry.name}: validation_inputs and validation_targets differ in length or are empty")
    return spec


@torch.no_grad()
def evaluate(spec: ModuleTaskSpec, model: nn.Module, batch_size: int) -> tuple[float, float]:
    """The validation loss and metric of ``model`` in ``eval()`` mode: the example-weighted mean over chunks of
    ``batch_size`` examples of ``spec.loss`` and ``spec.metric`` (both taken as means over their examples)."""
    model.eval()
    loss = metric = 0.0
    total = len(spec.validation_targets)
    for start in range(0, total, batch_size):
        inputs = spec.validation_inputs[start : start + batch_size]
        targets = spec.validation_targets[start : start + batch_size]
        outputs = model(inputs)
        loss += float(spec.loss(outputs, targets)) * len(targets)
        if spec.metric is not None:
            metric += float(spec.metric(outputs, targets)) * len(targets)
    model.train()
    return loss / total, (metric / total if spec.metric is not None else math.nan)


@torch.no_grad()
def recompute_batch_norm(model: nn.Module, data: ModuleData, seed: int, batches: int) -> bool:
    """Schedule-free's BatchNorm rule: recompute every BatchNorm's running statistics at the current (eval)
    weights over ``batches`` training minibatches in ``train()`` mode, as a plain average (PreciseBN); false
    where the model has no BatchNorm."""
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return False
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches below
    model.train()
    indices = minibatch_indices([seed], range(BN_STREAM, BN_STREAM + batches), data.batch_size, len(data.targets))
    for batch in indices[0]:
        model(data.inputs[batch])
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    return True


def run_validated(
    data: ModuleData,
    seeds: Sequence[int],
    steps: int,
    suite: Suite,
    make_optimizer: Callable[[list[nn.Parameter]], Stepped],
    progress: tqdm | None = None,
) -> Curves:
    """``make_optimizer``'s runs on ``data``, each evaluated at ``evaluation_steps``: a schedule-free
    optimizer switched to its evaluation weights (``eval()``) and, where the model has BatchNorm, its
    statistics recomputed there first; back to ``train()`` before the next update."""
    spec, at = data.definition, evaluation_steps(steps, suite.eval_every)
    index = {int(updates): i for i, updates in enumerate(at)}
    validation = torch.full((len(seeds), len(at)), math.nan, dtype=torch.float64)
    metric = validation.clone()

    def evaluate_run(run: int, updates: int, model: nn.Module, optimizer: Stepped) -> None:
        if updates not in index:
            return
        optimizer.eval()
        if optimizer.schedule_free:
            recompute_batch_norm(model, data, seeds[run], suite.peers.bn_batches)
        validation[run, index[updates]], metric[run, index[updates]] = evaluate(spec, model, suite.eval_batch_size)
        optimizer.train()

    train = train_modules(data, seeds, steps, make_optimizer, progress, evaluate=evaluate_run)
    return Curves(train, validation, metric)


def tuned_optimizer(baseline: Baseline, params: list[nn.Parameter], steps: int, suite: Suite) -> Stepped:
    """A grid configuration over ``params`` with its schedule over ``steps``."""
    optimizer = torch_optimizer(baseline, params, suite.baselines)
    return Stepped(optimizer, lr_scheduler(optimizer, baseline.schedule, steps, suite.warmup_fraction))


@dataclass
class Tuned:
    """A task's cached runs: every grid configuration's final validation loss and metric, each kind's best
    configuration with its curves, and each peer's curves."""

    scores: pd.DataFrame  # kind, lr, schedule, final_validation_loss, final_metric
    best_of_kind: dict[str, tuple[Baseline, Curves]]
    peers: dict[Peer, Curves]


def tune(data: ModuleData, seeds: Sequence[int], suite: Suite, steps: int, progress: tqdm | None) -> Tuned:
    """Every grid configuration and every peer on ``data``; the best configuration of each kind by final
    validation loss (the first of equals)."""
    configurations = grid_configurations(suite.baselines)
    runs = []
    for baseline in configurations:
        if progress is not None:
            progress.set_postfix_str(baseline.name)
        make = lambda params, baseline=baseline: tuned_optimizer(baseline, params, steps, suite)  # noqa: E731
        runs.append(run_validated(data, seeds, steps, suite, make, progress))
    scores = pd.DataFrame(
        {
            "kind": [c.kind for c in configurations],
            "lr": [c.lr for c in configurations],
            "schedule": [c.schedule for c in configurations],
            "final_validation_loss": [curves.final_validation_loss() for curves in runs],
            "final_metric": [curves.final_metric() for curves in runs],
        }
    )
    best_of_kind = {}
    for kind in suite.baselines.kinds:
        best = _best(scores[scores.kind == kind])
        best_of_kind[kind] = (best, runs[configurations.index(best)])
    ran = {}
    for peer in peers(suite):
        if progress is not None:
            progress.set_postfix_str(peer.name)
        make = lambda params, peer=peer: make_peer(peer, params, steps, suite)  # noqa: E731
        ran[peer] = run_validated(data, seeds, steps, suite, make, progress)
    return Tuned(scores, best_of_kind, ran)


def _best(scores: pd.DataFrame) -> Baseline:
    row = scores.iloc[int(np.argmin(scores.final_validation_loss.to_numpy()))]
    return Baseline(row.kind, float(row.lr), row.schedule)


def cache_key(entry: SuiteTask, suite: Suite, spec: ModuleTaskSpec, seeds: Sequence[int]) -> str:
    """A hash of what a task's tuned AdamW and peers depend on: its config, training and validation data and
    each run's initial parameters, its steps, and the suite's runs, seed, evaluation, grid and peers."""
    settings = {
        "format": CACHE_FORMAT,
        "task": entry.task.model_dump(mode="json"),
        "steps": entry.steps,
        "runs": suite.runs,
        "seed": suite.seed,
        "eval_every": suite.eval_every,
        "baselines": suite.baselines.model_dump(mode="json"),
        "warmup_fraction": suite.warmup_fraction,
        "peers": [peer.__dict__ for peer in peers(suite)],
        "bn_batches": suite.peers.bn_batches,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    tensors = [spec.inputs, spec.targets, spec.validation_inputs, spec.validation_targets]
    tensors += [t for seed in seeds for t in seeded_model(spec, seed).state_dict().values()]
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def curve_rows(curves: Curves, steps: int, eval_every: int, columns: dict) -> pd.DataFrame:
    """curves.parquet's rows of one optimizer: ``split`` train (every step) and validation (every
    evaluation, with the ``metric``)."""
    runs, length = curves.train.shape
    at = evaluation_steps(steps, eval_every)
    train = pd.DataFrame(
        {
            "split": "train",
            "run": np.repeat(np.arange(runs), length),
            "step": np.tile(np.arange(length), runs),
            "loss": curves.train.reshape(-1).numpy(),
            "metric": math.nan,
        }
    )
    validation = pd.DataFrame(
        {
            "split": "validation",
            "run": np.repeat(np.arange(runs), len(at)),
            "step": np.tile(at, runs),
            "loss": curves.validation.reshape(-1).numpy(),
            "metric": curves.metric.reshape(-1).numpy(),
        }
    )
    return pd.concat([train, validation], ignore_index=True).assign(**columns)


def read_curves(rows: pd.DataFrame) -> Curves:
    """The ``Curves`` in ``curve_rows``' rows of one optimizer."""

    def tensor(split: str, column: str) -> Tensor:
        part = rows[rows.split == split].sort_values(["run", "step"])
        return torch.tensor(part[column].to_numpy(), dtype=torch.float64).view(part.run.nunique(), -1)

    return Curves(tensor("train", "loss"), tensor("validation", "loss"), tensor("validation", "metric"))


def save_tuned(folder: Path, tuned: Tuned, steps: int, eval_every: int) -> None:
    """``scores.parquet`` and ``curves.parquet`` (each kind's best, each peer), atomically."""
    named = [(kind, curves) for kind, (_, curves) in tuned.best_of_kind.items()]
    named += [(peer.kind, curves) for peer, curves in tuned.peers.items()]
    curves = pd.concat([curve_rows(c, steps, eval_every, {"curve": name}) for name, c in named], ignore_index=True)
    save_curves(folder, {"scores": tuned.scores, "curves": curves})


def load_tuned(folder: Path, suite: Suite) -> Tuned:
    scores = pd.read_parquet(folder / "scores.parquet")
    curves = pd.read_parquet(folder / "curves.parquet")
    best_of_kind = {
        kind: (_best(scores[scores.kind == kind]), read_curves(curves[curves.curve == kind]))
        for kind in suite.baselines.kinds
    }
    ran = {peer: read_curves(curves[curves.curve == peer.kind]) for peer in peers(suite)}
    return Tuned(scores, best_of_kind, ran)


def validation_speedup(target: float, at: np.ndarray, curve: np.ndarray, steps: int) -> tuple[float, bool]:
    """(updates the tuned AdamW needs to reach validation loss ``target``) / ``steps``, read off its mean
    validation ``curve`` at updates ``at`` and interpolated linearly between evaluations; where it never
    reaches ``target`` within its run, 1 and flagged (a lower bound: ≥ 1). nan where the curve is not finite."""
    if not np.isfinite(curve).all() or math.isnan(target):
        return math.nan, False
    reached = np.flatnonzero(curve <= target)
    if not reached.size:
        return 1.0, True
    i = int(reached[0])
    if i == 0:
        return 0.0, False
    before, after = curve[i - 1], curve[i]
    updates = at[i - 1] + (before - target) / (before - after) * (at[i] - at[i - 1])
    return float(updates) / steps, False


def result_row(
    entry: SuiteTask,
    name: str,
    source: str | Baseline | Peer,
    curves: Curves,
    reference: tuple[Baseline, Curves],
    suite: Suite,
    selected: bool = False,
) -> dict:
    """One row of results.parquet: ``curves`` of optimizer ``name`` on ``entry`` against the tuned AdamW."""
    configured = source if isinstance(source, Baseline | Peer) else None
    best, best_curves = reference
    best_final, final = best_curves.final_validation_loss(), curves.final_validation_loss()
    ratio = final / best_final if math.isfinite(best_final) and best_final else math.nan
    at = evaluation_steps(entry.steps, suite.eval_every)
    speed, capped = validation_speedup(final, at, best_curves.validation.mean(0).numpy(), entry.steps)
    diverged = int(curves.diverged().sum())
    return {
        "task": entry.name,
        "optimizer": name,
        "learned": configured is None,
        "peer": isinstance(source, Peer),
        "source": "" if configured else source,
        "selected_on_this_suite": selected,
        "steps": entry.steps,
        "runs": len(curves.train),
        "eval_every": suite.eval_every,
        "initial_loss": float(curves.train[:, 0].mean()),
        "initial_validation_loss": float(curves.validation[:, 0].mean()),
        "final_train_loss": float(curves.train[:, -1].mean()),
        "final_validation_loss": final,
        "final_metric": curves.final_metric(),
        "validation_loss_ratio": ratio,
        "validation_speedup": speed,
        "speedup_capped": capped,
        "diverged": diverged > 0,
        "diverged_runs": diverged,
        "lr": configured.lr if configured else math.nan,
        "schedule": configured.schedule if configured else "",
        "baseline": best.kind,
        "baseline_lr": best.lr,
        "baseline_schedule": best.schedule,
        "baseline_validation_loss": best_final,
        "baseline_metric": best_curves.final_metric(),
    }


def run_suite(
    suite: Suite, learned: Sequence[Learned], cache: Path, show_progress: bool, suite_name: str = ""
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The results and curves of every task and optimizer; the tuned AdamW and the peers run or read from
    ``cache``. Every task's validation data is checked before anything trains."""
    seeds = optimizee_seeds(suite.seed, suite.runs, "meta_test")
    specs = [validation_data(entry) for entry in suite.tasks]
    folders = [
        cache / f"{entry.name}-validation-{cache_key(entry, suite, spec, seeds)}"
        for entry, spec in zip(suite.tasks, specs)
    ]
    cached_runs = len(grid_configurations(suite.baselines)) + len(suite.peer_kinds)
    total = sum(
        suite.runs * entry.steps * (len(learned) + (0 if folder.is_dir() else cached_runs))
        for entry, folder in zip(suite.tasks, folders)
    )
    results, curves = [], []
    with tqdm(total=total, desc="benchmark", unit="step", unit_scale=True, disable=not show_progress) as progress:
        for entry, spec, folder in zip(suite.tasks, specs, folders):
            data = ModuleData(spec, spec.inputs, spec.targets, entry.task.batch_size)
            if folder.is_dir():
                tuned = load_tuned(folder, suite)
                tqdm.write(f"{entry.name}: tuned AdamW and peers cached ({folder})")
            else:
                started = time.perf_counter()
                tuned = tune(data, seeds, suite, entry.steps, progress)
                save_tuned(folder, tuned, entry.steps, suite.eval_every)
                best = tuned.best_of_kind["adamw"][0]
                tqdm.write(
                    f"{entry.name}: tuned {len(tuned.scores)} baselines and ran {len(tuned.peers)} peers in "
                    f"{time.perf_counter() - started:.0f} s, best {best.name}; cached in {folder}"
                )
            runs = [(kind, baseline, c, False) for kind, (baseline, c) in tuned.best_of_kind.items()]
            runs += [(peer.name, peer, c, False) for peer, c in tuned.peers.items()]
            for optimizer in learned:
                progress.set_postfix_str(f"{entry.name}: {optimizer.name}")
                make = lambda params, optimizer=optimizer, steps=entry.steps: Stepped(  # noqa: E731
                    learned_optimizer(optimizer, params, steps)
                )
                ran = run_validated(data, seeds, entry.steps, suite, make, progress)
                runs.append((optimizer.name, optimizer.source, ran, optimizer.selected_on_suite(suite_name)))
            for name, source, ran, selected in runs:
                row = result_row(entry, name, source, ran, tuned.best_of_kind["adamw"], suite, selected)
                results.append(row)
                columns = {"task": entry.name, "optimizer": name}
                curves.append(curve_rows(ran, entry.steps, suite.eval_every, columns))
    return pd.DataFrame(results), pd.concat(curves, ignore_index=True)


def write_report(results: pd.DataFrame, curves: pd.DataFrame, output_dir: Path, title: str) -> str:
    """Write results.parquet, curves.parquet, results.md and validation_curves.png; return the report."""
    report, figure = markdown_report(results, title), validation_figure(curves, title)
    return save_report(results, curves, output_dir, report, figure, "validation_curves.png")


def _number(value: float, spec: str) -> str:
    return "–" if isinstance(value, float) and math.isnan(value) else format(value, spec)


def markdown_report(results: pd.DataFrame, title: str) -> str:
    """The table of every task and optimizer, then the learned optimizers over meta-training seeds where
    several share a name prefix (``NAME@seed0``, ``NAME@seed1``, ...)."""
    lines = [
        f"# {title}",
        "",
        "Scored on held-out validation data. Final validation loss and metric: means over runs after the last "
        "update. Loss ratio: final validation loss / the tuned AdamW's (bold). Validation speedup: updates the "
        "tuned AdamW needs to reach the final validation loss (interpolated between evaluations) / the run's "
        "steps (≥ 1: it never does within its run).",
        "",
        "| task | optimizer | final validation loss | metric | validation loss ratio | validation speedup | diverged |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results.itertuples():
        name = row.optimizer if row.learned else f"{row.optimizer} (lr {row.lr:g}, {row.schedule})"
        if not row.learned and not row.peer and row.optimizer == row.baseline:
            name = f"**{name}**"
        name += SELECTED_MARK if row.selected_on_this_suite else ""
        speed = "≥ 1" if row.speedup_capped else _number(row.validation_speedup, ".2f")
        lines.append(
            f"| {row.task} | {name} | {row.final_validation_loss:.4g} | {_number(row.final_metric, '.4g')} | "
            f"{_number(row.validation_loss_ratio, '.3g')} | {speed} | {row.diverged_runs}/{row.runs} |"
        )
    table = seed_table(results)
    if table is not None:
        summary, medians = seed_aggregate(table)
        lines += [
            "",
            "Over meta-training seeds (`NAME@SEED`): the interquartile mean over tasks × seeds of "
            "log(final validation loss / the tuned AdamW's), with a bootstrap 95% interval over tasks; the "
            "median seed per task.",
            "",
            "| learned optimizer | seeds | IQM log ratio | 95% interval | median seed per task |",
            "|---|---|---|---|---|",
        ]
        for row in summary.itertuples():
            chosen = medians[medians.optimizer == row.optimizer]
            per_task = ", ".join(f"{r.task}: {r.seed}" for r in chosen.itertuples())
            lines.append(
                f"| {row.optimizer} | {row.seeds} | {row.iqm_log_ratio:.3g} | "
                f"[{row.ci_low:.3g}, {row.ci_high:.3g}] | {per_task} |"
            )
    return "\n".join(lines + selection_footnote(results)) + "\n"


def seed_table(results: pd.DataFrame) -> pd.DataFrame | None:
    """The learned rows named ``NAME@SEED`` as (task, optimizer NAME, seed SEED, loss, reference), where a
    NAME has at least two seeds; None where none has."""
    learned = results[results.learned & results.optimizer.str.contains("@")]
    if learned.empty:
        return None
    parts = learned.optimizer.str.rsplit("@", n=1, expand=True)
    name, seed = parts[0], parts[1]
    table = pd.DataFrame(
        {
            "task": learned.task.to_numpy(),
            "optimizer": name.to_numpy(),
            "seed": seed.to_numpy(),
            "loss": learned.final_validation_loss.to_numpy(),
            "reference": learned.baseline_validation_loss.to_numpy(),
        }
    )
    several = table.groupby("optimizer").seed.nunique()
    table = table[table.optimizer.isin(several[several >= 2].index)]
    return table if len(table) else None


def interquartile_mean(values: np.ndarray) -> float:
    """The mean of the middle half of ``values``: 25% of them cut from each end (``scipy.stats.trim_mean``)."""
    from scipy.stats import trim_mean

    return float(trim_mean(np.asarray(values, dtype=np.float64), 0.25))


def seed_aggregate(table: pd.DataFrame, resamples: int = 1000, rng_seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Learned optimizers over their meta-training seeds rather than their best seed.

    ``table``: one row per (task, optimizer, seed) with the final validation ``loss`` and the tuned AdamW's
    (``reference``). Returns per optimizer (``summary``): the interquartile mean over tasks × seeds of
    log(loss / reference), and its bootstrap 95% interval from ``resamples`` resamples of the tasks with
    replacement (each resampled task with all its seeds; RNG seeded with ``rng_seed``); and (``medians``) per
    optimizer and task the median seed: the seed whose loss is the median over seeds (the lower middle one
    of an even number)."""
    table = table.assign(log_ratio=np.log(table.loss.to_numpy() / table.reference.to_numpy()))
    summaries, medians = [], []
    for name, rows in table.groupby("optimizer", sort=False):
        for task, seeds in rows.groupby("task", sort=False):
            ordered = seeds.sort_values(["loss", "seed"], kind="stable")
            middle = ordered.iloc[(len(ordered) - 1) // 2]
            medians.append({"optimizer": name, "task": task, "seed": middle.seed, "loss": middle.loss})
        tasks = list(dict.fromkeys(rows.task))
        by_task = [rows.log_ratio[rows.task == task].to_numpy() for task in tasks]
        rng = np.random.default_rng(rng_seed)
        draws = [
            interquartile_mean(np.concatenate([by_task[i] for i in rng.integers(0, len(tasks), len(tasks))]))
            for _ in range(resamples)
        ]
        low, high = np.percentile(draws, [2.5, 97.5])
        summaries.append(
            {
                "optimizer": name,
                "tasks": len(tasks),
                "seeds": rows.seed.nunique(),
                "iqm_log_ratio": interquartile_mean(rows.log_ratio.to_numpy()),
                "ci_low": float(low),
                "ci_high": float(high),
            }
        )
    return pd.DataFrame(summaries), pd.DataFrame(medians)


def validation_figure(curves: pd.DataFrame, title: str):
    """One subplot per task: each optimizer's validation loss (mean over runs) against the step, log-scaled."""
    from matplotlib.figure import Figure

    validation = curves[curves.split == "validation"]
    tasks = list(dict.fromkeys(validation.task))
    columns = min(3, len(tasks))
    rows = math.ceil(len(tasks) / columns)
    figure = Figure(figsize=(4.5 * columns, 3.6 * rows + 0.6))
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    for axis, task in zip(axes, tasks):
        for name, part in validation[validation.task == task].groupby("optimizer", sort=False):
            mean = part.groupby("step").loss.mean()
            finite = np.isfinite(mean.to_numpy()) & (mean.to_numpy() > 0)
            axis.plot(mean.index[finite], mean.to_numpy()[finite], label=name, linewidth=1.2)
        axis.set_yscale("log")
        axis.set_title(task)
        axis.set_xlabel("step")
        axis.set_ylabel("validation loss")
        axis.grid(True, which="major", alpha=0.3)
        axis.legend(fontsize="x-small")
    for axis in axes[len(tasks) :]:
        axis.set_visible(False)
    figure.suptitle(title)
    figure.tight_layout()
    return figure
