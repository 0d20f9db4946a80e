"""Run a search: Tune trials on the Ray cluster, each an MLflow run nested under the search's run;
then the best trial's optimizer against the default architecture and the tuned baselines, and
registered (alias ``candidate``)."""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
from ray.tune.search.basic_variant import BasicVariantGenerator

from metaopt.config import ConfigError
from metaopt.distributed import ray_connection, worker_resources
from metaopt.evaluate import Candidate
from metaopt.meta import MetaTrainer, load_checkpoint
from metaopt.pipeline import compare_track_register, gradient_source
from metaopt.tracking.tracker import flatten
from metaopt.tune.space import METRIC, SearchSpace
from metaopt.tune.trainable import REPORTED, meta_train_trial

RESULTS = "results.parquet"


class TrialRuns(tune.Callback):
    """Every trial as an MLflow run nested under the search's run, written by the driver only."""

    def __init__(self, space: SearchSpace, folder: Path, parent_run_id: str, tracking_uri: str, experiment: str):
        self.space, self.folder = space, Path(folder)
        self.parent_run_id, self.tracking_uri, self.experiment = parent_run_id, tracking_uri, experiment
        self.trackers: dict[str, Any] = {}

    def __getstate__(self) -> dict:  # Tune saves callbacks with the experiment; clients stay behind
        return {**self.__dict__, "trackers": {}}

    def tracker(self, trial):
        """The trial's tracker: its run is created on first sight and continued after a restore."""
        from metaopt.tracking import RunTracker

        if trial.trial_id not in self.trackers:
            folder = self.folder / trial.trial_id
            new = not folder.exists()
            tracker = RunTracker(
                folder, self.tracking_uri, self.experiment, run_name=str(trial), parent_run_id=self.parent_run_id
            )
            if new:
                config = self.space.trial_config(trial.config)
                tracker.log_params(flatten(config.model_dump(mode="json")))
                tracker.set_tags(
                    {
                        "metaopt.tune.trial": trial.trial_id,
                        "metaopt.task": config.task.kind,
                        "metaopt.optimizer": config.optimizer.kind,
                    }
                )
            self.trackers[trial.trial_id] = tracker
        return self.trackers[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self.tracker(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        metrics = {k: result[k] for k in (METRIC, *REPORTED) if k in result}
        # PBT changes these mid-run: their schedule is a curve, not a param.
        metrics |= {f"config.{k}": float(result["config"][k]) for k in self.space.mutations}
        self.tracker(trial).log_metrics(int(result["meta_step"]), metrics)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.tracker(trial).finish()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.tracker(trial).finish("FAILED")


@dataclass
class SearchOutcome:
    """What a search produced: its folder, the results table, and the best trial."""

    folder: Path
    results: pd.DataFrame
    best_checkpoint: Path
    best_heldout: float
    comparison: str
    parent_run_id: str | None = None
    registered_version: int | None = None


def trial_resources(space: SearchSpace) -> tune.PlacementGroupFactory:
    """The trial's learner bundle, plus one bundle per RolloutWorker when trials meta-train on Ray;
    fails before any trial starts when the cluster cannot host one trial."""
    search, config = space.spec.search, space.config
    cluster = ray.cluster_resources()
    bundles: list[dict[str, float]] = [{"CPU": search.trial_cpus}]
    if config.distributed is None:
        if search.trial_gpus:
            bundles[0]["GPU"] = search.trial_gpus
    else:
        dist = config.distributed
        worker = worker_resources(dist, cluster)
        space.base["distributed"]["num_gpus"] = worker.get("GPU", 0.0)  # the trial's workers ask for what is reserved
        bundles += [dict(worker) for _ in range(dist.workers)]
    for resource in ("CPU", "GPU"):
        need, have = sum(b.get(resource, 0.0) for b in bundles), cluster.get(resource, 0.0)
        if need > have:
            workers = (
                f" + distributed.workers {config.distributed.workers} × num_cpus {config.distributed.num_cpus}"
                if config.distributed and resource == "CPU"
                else ""
            )
            raise ConfigError(
                f"one trial needs {need:g} {resource} (search.trial_{resource.lower()}s{workers}) but the Ray "
                f"cluster has {have:g}; lower search.trial_{resource.lower()}s"
                + (
                    " or the trial's distributed.workers / num_cpus (or set distributed: null to train in-process)"
                    if config.distributed
                    else ""
                )
                + ", or add nodes"
            )
    largest = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)
    if max(b["CPU"] for b in bundles) > largest:
        raise ConfigError(
            f"a trial bundle needs {max(b['CPU'] for b in bundles):g} CPUs but the largest Ray node "
            f"has {largest:g}; lower search.trial_cpus or distributed.num_cpus"
        )
    return tune.PlacementGroupFactory(bundles)


def _search_algorithm(space: SearchSpace):
    search = space.spec.search
    if search.searcher == "optuna":
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(sampler=TPESampler(seed=search.seed))
    # Tune applies max_concurrent_trials only to Searchers; this generator limits itself.
    return BasicVariantGenerator(random_state=search.seed, max_concurrent=search.max_concurrent_trials or 0)


def _scheduler(space: SearchSpace):
    search, train = space.spec.search, space.config.train
    validations = math.ceil(train.meta_steps / train.eval_every)
    if search.scheduler == "asha":
        if search.grace_period > validations:
            raise ConfigError(
                f"search.grace_period ({search.grace_period}) exceeds the validations a trial "
                f"makes ({validations} = train.meta_steps / train.eval_every); lower it"
            )
        return ASHAScheduler(
            time_attr="training_iteration",
            max_t=validations,
            grace_period=search.grace_period,
            reduction_factor=search.reduction_factor,
        )
    if search.scheduler == "pbt":
        from ray.tune.search.sample import Categorical

        # A list makes PBT move to a neighbouring choice; a choice domain would be scaled by 0.8/1.2 instead.
        mutations = {k: (d.categories if isinstance(d, Categorical) else d) for k, d in space.mutations.items()}
        return PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=space.spec.pbt.perturbation_interval,
            hyperparam_mutations=mutations,
        )
    return FIFOScheduler()


def _tracking(space: SearchSpace, folder: Path, enabled: bool):
    """The search's own MLflow run (the parent of every trial's), or None with tracking off."""
    tracking = space.config.tracking
    if not (enabled and tracking.enabled):
        return None
    from metaopt.tracking import RunTracker

    parent = RunTracker(folder, tracking.uri, tracking.experiment, run_name=folder.name)
    if parent.buffered == 0 and not (folder / "search.yaml").exists():
        parent.log_params({"search.source": space.source, **flatten(space.spec.model_dump(mode="json"))})
        parent.set_tags(
            {
                "metaopt.task": space.config.task.kind,
                "metaopt.optimizer": space.config.optimizer.kind,
                "metaopt.tune": "search",
            }
        )
    return parent


def run_search(
    space: SearchSpace,
    folder: Path | None = None,
    address: str | None = None,
    resume: bool = False,
    tracking: bool = True,
    show_progress: bool = True,
) -> SearchOutcome:
    """Run (or with ``resume``, continue) the search in ``folder`` and compare and register its best."""
    search = space.spec.search
    folder = Path(folder or Path(search.output_dir) / f"{Path(space.source).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    folder = folder.resolve()
    if resume and not tune.Tuner.can_restore(str(folder)):
        raise ConfigError(
            f"--resume {folder}: no Tune experiment to resume there (expected the folder a `metaopt tune` run printed)"
        )
    with ray_connection(address):
        resources = trial_resources(space)
        trainable = tune.with_resources(tune.with_parameters(meta_train_trial, space=space), resources)
        folder.mkdir(parents=True, exist_ok=True)
        parent = _tracking(space, folder, tracking)
        (folder / "search.yaml").write_text(yaml.safe_dump(space.spec.model_dump(mode="json"), sort_keys=False))
        callbacks = (
            [
                TrialRuns(
                    space,
                    folder / "mlflow_trials",
                    parent.run_id,
                    parent.tracking_uri,
                    space.config.tracking.experiment,
                )
            ]
            if parent
            else []
        )
        if resume:
            tuner = tune.Tuner.restore(str(folder), trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=space.param_space,
                tune_config=tune.TuneConfig(
                    metric=METRIC,
                    mode="min",
                    search_alg=_search_algorithm(space),
                    scheduler=_scheduler(space),
                    num_samples=search.samples,
                    reuse_actors=True,
                    max_concurrent_trials=search.max_concurrent_trials if search.searcher != "random" else None,
                ),
                run_config=tune.RunConfig(
                    name=folder.name,
                    storage_path=str(folder.parent),
                    callbacks=callbacks,
                    verbose=1 if show_progress else 0,
                    # A trial's run folder is scratch space; what persists is what it reports.
                    sync_config=tune.SyncConfig(sync_artifacts=False, sync_artifacts_on_checkpoint=False),
                    checkpoint_config=tune.CheckpointConfig(  # every one kept: a few KB each
                        checkpoint_score_attribute=METRIC, checkpoint_score_order="min"
                    ),
                ),
            )
        grid = tuner.fit()
        results = results_table(grid, space)
        results.to_parquet(folder / RESULTS, index=False)
        (folder / "results.md").write_text(markdown_table(results, space))
        finished = [r for r in grid if r.best_checkpoints]
        if not finished:
            errors = "; ".join(f"{r.path}: {type(r.error).__name__}: {r.error}" for r in grid if r.error)[:2000]
            raise RuntimeError(f"no trial of the search reported a checkpoint ({errors or 'no errors recorded'})")
        best = min(finished, key=lambda r: min(_score(m) for _, m in r.best_checkpoints))
        checkpoint, metrics = min(best.best_checkpoints, key=lambda cm: _score(cm[1]))
        outcome = _compare_track_register(
            space, folder, results, best, Path(checkpoint.path), metrics, parent, show_progress
        )
    return outcome


def _score(metrics: dict) -> float:
    """A report's validation loss, with a diverged (NaN) one ranked last."""
    loss = float(metrics[METRIC])
    return loss if not math.isnan(loss) else math.inf


def _compare_track_register(
    space: SearchSpace,
    folder: Path,
    results: pd.DataFrame,
    best,
    checkpoint: Path,
    metrics: dict,
    parent,
    show_progress: bool,
) -> SearchOutcome:
    """The best trial's optimizer (and the default architecture, meta-trained on the same budget) against
    the tuned baselines on the held-out optimizees, through the one after-training pipeline: ``folder/best``
    holds it, its trial's MLflow run gets it, and it is registered; the search's run gets the results."""
    config = space.trial_config(best.config)
    best_dir = folder / "best"
    shutil.rmtree(best_dir, ignore_errors=True)
    shutil.copytree(checkpoint, best_dir / "checkpoints" / "best")
    (best_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    learned, best_params, _ = load_checkpoint(best_dir / "checkpoints" / "best")
    kind = config.optimizer.kind
    leading = [Candidate(f"{kind} (tuned)", lambda lr: learned, meta_params=best_params)]
    if space.spec.search.compare_default:
        default_config = space.trial_config({})
        with gradient_source(default_config) as workers:
            trainer = MetaTrainer(default_config, folder / "default", gradient_source=workers)
            trainer.train(show_progress=show_progress)
        default, default_params, _ = load_checkpoint(trainer.best_checkpoint)
        leading.append(Candidate(f"{kind} (default architecture)", lambda lr: default, meta_params=default_params))
    title = (
        f"{config.task.kind}: best of {len(results)} trials vs the default architecture and hand-designed, "
        f"{config.evaluate.runs} held-out runs"
    )
    heldout, trial_id = float(metrics[METRIC]), best.metrics["trial_id"]
    trial = None
    if parent:
        from metaopt.tracking import RunTracker

        trial = RunTracker(folder / "mlflow_trials" / trial_id, start=False)
    search = space.spec.search
    finished = compare_track_register(
        config,
        best_dir,
        leading,
        title,
        trial,
        (search.register_as, search.alias) if search.register_as else None,
        tags={
            "task": config.task.kind,
            "heldout_loss": heldout,
            "tune_search": parent.run_id if parent else None,
            "meta_step": int(metrics["meta_step"]),
        },
        show_progress=show_progress,
    )
    if finished.register_error:
        raise RuntimeError(
            f"registering {search.register_as} failed ({finished.register_error}); the search's "
            f"best optimizer is in {best_dir}"
        )
    outcome = SearchOutcome(
        folder,
        results,
        best_dir / "checkpoints" / "best",
        heldout,
        finished.table,
        registered_version=finished.registered_version,
    )
    if parent:
        for name in (RESULTS, "results.md", "search.yaml"):
            parent.log_artifacts_file(folder / name)
        parent.log_artifacts(best_dir / "evaluation", "evaluation")
        parent.log_metrics(0, {f"best_{METRIC}": heldout})
        parent.set_tags({"metaopt.tune.best_trial": trial_id})
        parent.finish()
        outcome.parent_run_id = parent.run_id
    return outcome


def results_table(grid, space: SearchSpace) -> pd.DataFrame:
    """A row per trial: its sampled values, best and last validation loss, meta-steps done, status."""
    rows = []
    total = space.config.train.meta_steps
    for result in grid:
        history = result.metrics_dataframe
        reported = history is not None and METRIC in history
        meta_steps = int(history["meta_step"].max()) if reported else 0
        status = "error" if result.error else "completed" if meta_steps >= total else "stopped early"
        rows.append(
            {
                "trial": result.metrics.get("trial_id", Path(result.path).name)
                if result.metrics
                else Path(result.path).name,
                **{key: result.config.get(key) for key in space.param_space},
                METRIC: float(history[METRIC].min()) if reported else math.nan,
                f"last_{METRIC}": float(history[METRIC].iloc[-1]) if reported else math.nan,
                "meta_steps": meta_steps,
                "status": status,
            }
        )
    return pd.DataFrame(rows).sort_values(METRIC, na_position="last").reset_index(drop=True)


def markdown_table(results: pd.DataFrame, space: SearchSpace) -> str:
    """The results as a Markdown table, parameter names shortened to their last part."""
    short = {key: key.removeprefix("optimizer.options.").removeprefix("train.") for key in space.param_space}
    columns = ["trial", *space.param_space, METRIC, "meta_steps", "status"]
    lines = ["| " + " | ".join(short.get(c, c) for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in results[columns].itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
