"""The ``metaopt`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from metaopt import __version__
from metaopt.config import ConfigError, DistributedConfig, load_config
from metaopt.meta.checkpoint import CheckpointError
from metaopt.tasks import DataNotFoundError, TaskFactoryError


def _evaluate(args: argparse.Namespace) -> int:
    from metaopt.evaluate import default_output_dir, run_evaluation

    config = load_config(args.config, args.set)
    config.require("evaluate")
    output_dir = Path(args.output) if args.output else default_output_dir(config, Path(args.config).stem, "evaluate")
    print(f"metaopt evaluate: writing to {output_dir}")
    _, table = run_evaluation(config, output_dir, show_progress=not args.no_progress)
    print(table)
    print(f"results: {output_dir} (curves.parquet, summary.parquet, table.md, curves.png)")
    return 0


def _train(args: argparse.Namespace) -> int:
    from metaopt.evaluate import Candidate, default_output_dir, stretched_to, with_options
    from metaopt.meta import MetaTrainer, load_checkpoint
    from metaopt.meta.checkpoint import resume_paths, trained_on
    from metaopt.pipeline import compare_track_register, gradient_source

    config = load_config(args.config, args.set)
    config.require("optimizer", "train", "evaluate")
    if args.address and config.distributed is None:
        config.distributed = DistributedConfig()
    if args.tracking_uri:
        config.tracking.uri = args.tracking_uri
    if args.register:
        config.tracking.register_as = args.register
    if args.no_tracking:
        config.tracking.enabled = False
    output = Path(args.output) if args.output else None
    if args.resume:  # checked before anything is written
        resume, run_dir = resume_paths(Path(args.resume), output)
    else:
        run_dir = output or default_output_dir(config, Path(args.config).stem, "train")
    with gradient_source(config, args.address) as source:
        trainer = MetaTrainer(config, run_dir, gradient_source=source)
        if args.resume:
            trainer.resume(resume)
            print(f"metaopt train: resuming {resume} at meta-step {trainer.meta_step}, writing to {run_dir}")
        where = (
            f"on Ray with {config.distributed.workers} {config.distributed.mode} worker(s)"
            if source
            else "in this process"
        )
        print(
            f"metaopt train: {config.optimizer.kind} ({trainer.optimizer.num_meta_params()} meta-parameters) "
            f"on {config.task.kind} {where}; writing to {run_dir}"
        )
        tracker = _start_tracking(config, run_dir)
        try:
            checkpoint = trainer.train(
                show_progress=not args.no_progress, on_metrics=_metrics_sink(tracker, print_validation=args.no_progress)
            )
        except BaseException:
            if tracker:
                tracker.finish("FAILED" if not isinstance(sys.exc_info()[1], KeyboardInterrupt) else "KILLED")
            raise
    print(f"final checkpoint: {checkpoint}")

    _, best_params, best_spec = load_checkpoint(trainer.best_checkpoint)
    print(
        f"best checkpoint: {trainer.best_checkpoint} (meta-step {best_spec['meta_step']}, "
        f"validation loss {trainer.best_heldout:.4g})"
    )
    learned = config.optimizer.kind
    on_device = lambda params: {k: v.to(trainer.device) for k, v in params.items()}  # noqa: E731
    optimizer = stretched_to(with_options(trainer.optimizer, config.optimizer.evaluate_options), config.evaluate.steps)
    leading = [
        Candidate(learned, lambda lr: optimizer, meta_params=on_device(best_params)),
        Candidate(
            f"{learned} (untrained)",
            lambda lr: optimizer,
            meta_params=on_device(trainer.optimizer.init_meta_params(config.train.seed)),
        ),
    ]
    title = (
        f"{config.task.kind}: {learned} (best of {trainer.meta_step} meta-steps) vs hand-designed, "
        f"{config.evaluate.runs} held-out runs"
    )
    register = (config.tracking.register_as, config.tracking.alias) if config.tracking.register_as else None
    outcome = compare_track_register(
        config,
        run_dir,
        leading,
        title,
        tracker,
        register,
        tags={"task": trained_on(best_spec), "heldout_loss": trainer.best_heldout},
        artifacts=[(checkpoint, f"checkpoints/{checkpoint.name}"), (run_dir / "metrics.parquet", None)],
        show_progress=not args.no_progress,
    )
    print(outcome.table)
    print(f"results: {run_dir} (checkpoints/, metrics.parquet, evaluation/)")
    if tracker:
        _print_tracking(tracker, config, run_dir, outcome, trained_on(best_spec))
    return 0


def _tune(args: argparse.Namespace) -> int:
    from metaopt.tune import load_search
    from metaopt.tune.search import run_search

    overrides = list(args.set)
    if args.samples is not None:
        overrides.append(f"search.samples={args.samples}")
    if args.register:
        overrides.append(f"search.register_as={args.register}")
    space = load_search(args.config, overrides)
    if space.spec.search.register_as and (args.no_tracking or not space.config.tracking.enabled):
        raise ConfigError(
            "registering the best optimizer needs MLflow tracking: drop --no-tracking "
            "(or tracking.enabled: false), or drop --register / search.register_as"
        )
    if args.tracking_uri:
        space.config.tracking.uri = args.tracking_uri
    folder = Path(args.resume or args.output) if (args.resume or args.output) else None
    search = space.spec.search
    print(
        f"metaopt tune: {search.samples} trial(s) of {space.config.optimizer.kind} on {space.config.task.kind}, "
        f"{search.searcher} search, {search.scheduler} scheduling" + (f"; resuming {folder}" if args.resume else "")
    )
    outcome = run_search(
        space,
        folder,
        address=args.address,
        resume=bool(args.resume),
        tracking=not args.no_tracking,
        show_progress=not args.no_progress,
    )
    print((outcome.folder / "results.md").read_text())
    print(outcome.comparison)
    print(
        f"results: {outcome.folder} (results.parquet, results.md, best/, default/, Tune's trial folders); "
        f"resume an interrupted search with --resume {outcome.folder}"
    )
    if outcome.parent_run_id:
        print(f"MLflow: search run {outcome.parent_run_id} with one nested run per trial")
    if outcome.registered_version is not None:
        name, alias = search.register_as, search.alias
        print(
            f"registered {name} version {outcome.registered_version} as @{alias}; "
            f"metaopt.load_optimizer('models:/{name}@{alias}', model.parameters())"
        )
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    from metaopt.benchmark import default_output_dir, load_suite, resolve_learned, run_benchmark

    suite = load_suite(args.suite, args.set)
    learned = [resolve_learned(source, args.tracking_uri) for source in args.optimizer]
    name = Path(args.suite).stem
    output_dir = Path(args.output) if args.output else default_output_dir(suite, name)
    print(
        f"metaopt benchmark: {len(suite.tasks)} task(s) x {suite.runs} runs, "
        f"{', '.join(o.name for o in learned) or 'baselines only'}; writing to {output_dir}"
    )
    scored = ", scored on validation data" if suite.score == "validation" else ""
    title = f"{name}: {len(suite.tasks)} tasks, {suite.runs} runs each{scored}"
    cache = Path(args.cache_dir) if args.cache_dir else None
    print(run_benchmark(suite, learned, output_dir, title, cache, not args.no_progress, args.threads, name))
    plot = "validation_curves.png" if suite.score == "validation" else "speedup.png"
    print(f"results: {output_dir} (results.parquet, curves.parquet, results.md, {plot})")
    return 0


def _start_tracking(config, run_dir: Path):
    """The run's MLflow tracker (config as flattened params), or None with tracking disabled."""
    if not config.tracking.enabled:
        return None
    from metaopt.tracking import RunTracker
    from metaopt.tracking.tracker import flatten

    tracker = RunTracker(run_dir, config.tracking.uri, experiment=config.tracking.experiment)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    tracker.log_params(flatten(config.model_dump(mode="json")))
    tracker.set_tags({"metaopt.task": config.task.kind, "metaopt.optimizer": config.optimizer.kind})
    return tracker


def _metrics_sink(tracker, print_validation: bool):
    def sink(meta_step: int, metrics: dict[str, float]) -> None:
        if tracker:
            tracker.log_metrics(meta_step, metrics)
        if print_validation:
            _print_validation(meta_step, metrics)

    return sink


def _print_tracking(tracker, config, run_dir: Path, outcome, trained: str) -> None:
    """Where the run's MLflow writes went, and how to load (or register) its optimizer, meta-trained on ``trained``."""
    uri = tracker.tracking_uri
    name, alias = config.tracking.register_as, config.tracking.alias
    register_later = f"`metaopt registry --tracking-uri {uri} register {tracker.run_id or 'RUN_ID'} {name}`"
    if tracker.buffered:
        print(
            f"MLflow at {uri} was unreachable: {tracker.buffered} write(s) wait in {run_dir}; "
            f"deliver them with `metaopt sync {run_dir}`" + (f", then register with {register_later}" if name else "")
        )
        return
    print(f"MLflow run {tracker.run_id} at {uri}; open it with: mlflow ui --backend-store-uri {uri}")
    if outcome.register_error:
        print(
            f"registering {name} failed ({outcome.register_error}); the run and its checkpoints are saved; "
            f"register it later with {register_later}",
            file=sys.stderr,
        )
    elif outcome.registered_version is not None:
        source = f"models:/{name}@{alias}"
        print(
            f"registered {name} version {outcome.registered_version} ({source}) at {uri}, meta-trained on "
            f"{trained}; load it with:\n  import metaopt; opt = metaopt.load_optimizer({source!r}, "
            f"model.parameters(), tracking_uri={uri!r})"
        )
        if not trained.startswith("a mixture"):
            print(
                f"It suits tasks like those it was meta-trained on ({trained}); for your own models, start from "
                "the optimizer meta-trained on a task mixture: metaopt.load_optimizer('pretrained:general', "
                "model.parameters(), horizon=<your run's steps>)"
            )


def _sync(args: argparse.Namespace) -> int:
    from metaopt.tracking import RunTracker
    from metaopt.tracking.tracker import BUFFER

    run_dir = Path(args.run_dir)
    if not (run_dir / BUFFER).exists():
        print(f"metaopt sync: nothing to deliver: {run_dir} has no {BUFFER}")
        return 0
    tracker = RunTracker(run_dir, args.tracking_uri, start=False)
    left = tracker.sync()
    if left:
        print(
            f"metaopt sync: {tracker.tracking_uri} is still unreachable; {left} write(s) wait in {run_dir / BUFFER}",
            file=sys.stderr,
        )
        return 1
    print(f"metaopt sync: delivered to run {tracker.run_id} at {tracker.tracking_uri}")
    return 0


def _registry(args: argparse.Namespace) -> int:
    from metaopt.tracking import registry

    uri = args.tracking_uri
    if args.action == "register":
        if args.source.startswith(registry.PRETRAINED_PREFIX) or Path(args.source).is_dir():
            version = registry.register_checkpoint(args.source, args.name, args.alias, tracking_uri=uri)
        else:
            version = registry.register_run(args.source, args.name, args.alias, tracking_uri=uri)
        print(f"registered {args.name} version {version}" + (f" as @{args.alias}" if args.alias else ""))
    elif args.action == "list":
        rows = registry.list_models(uri)
        print("| name | versions | latest | aliases |\n|---|---|---|---|")
        for row in rows:
            aliases = ", ".join(f"@{a} → {v}" for a, v in sorted(row["aliases"].items()))
            print(f"| {row['name']} | {row['versions']} | {row['latest_version']} | {aliases} |")
    elif args.action == "show":
        rows = registry.show_model(args.name, uri)
        print("| version | aliases | task | heldout_loss | run |\n|---|---|---|---|---|")
        for row in rows:
            tags = row["tags"]
            print(
                f"| {row['version']} | {', '.join('@' + a for a in row['aliases'])} | {tags.get('task', '')} | "
                f"{tags.get('heldout_loss', '')} | {row['run_id']} |"
            )
    elif args.action == "promote":
        registry.promote(args.name, args.version, args.alias, uri)
        print(f"{args.name}@{args.alias} → version {args.version}")
    elif args.action == "pull":
        source = args.source if ":/" in args.source else f"models:/{args.source}"
        folder = registry.pull(source, Path(args.directory), uri)
        print(
            f"pulled {source} into {folder}; load it with metaopt.load_optimizer({str(folder)!r}, model.parameters())"
        )
    return 0


def _print_validation(meta_step: int, metrics: dict[str, float]) -> None:
    """Without a progress bar (e.g. in a Ray job's log), a line per validation."""
    if "heldout_loss" in metrics:
        print(
            f"meta-step {meta_step}: meta-loss {metrics['meta_loss']:.4g}, validation loss "
            f"{metrics['heldout_loss']:.4g}, {metrics['optimizee_steps_per_s']:.0f} optimizee steps/s",
            flush=True,
        )


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config, e.g. jobs/configs/quadratic.yaml")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set evaluate.runs=10 (repeatable)",
    )
    parser.add_argument("--output", metavar="DIR", help="output folder (default: <output_dir>/<config>-<time>)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """``metaopt train``'s options and handler, all but CONFIG (jobs/meta_train.py takes it as --config)."""
    _add_run_options(parser)
    parser.add_argument(
        "--resume", metavar="PATH", help="continue a run folder (its latest checkpoint) or a checkpoint folder"
    )
    parser.add_argument(
        "--address",
        metavar="ADDRESS",
        help="Ray cluster to meta-train on (default: distributed.address, RAY_ADDRESS, a running "
        "`ray start` cluster, else a local Ray); implies a distributed section",
    )
    parser.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow tracking URI (default: tracking.uri, MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    parser.add_argument("--register", metavar="NAME", help="register the best optimizer as MLflow model NAME")
    parser.add_argument("--no-tracking", action="store_true", help="do not track the run in MLflow")
    parser.set_defaults(handler=_train, command="train")


def add_tune_options(parser: argparse.ArgumentParser) -> None:
    """``metaopt tune``'s options and handler, all but CONFIG (jobs/tune.py takes it as --config)."""
    _add_run_options(parser)
    parser.add_argument("--samples", type=int, metavar="N", help="trials to run (default: search.samples)")
    parser.add_argument(
        "--address",
        metavar="ADDRESS",
        help="Ray cluster (default: RAY_ADDRESS, a running `ray start` cluster, else a local Ray)",
    )
    parser.add_argument("--resume", metavar="DIR", help="continue the interrupted search in DIR (Tuner.restore)")
    parser.add_argument("--register", metavar="NAME", help="register the best optimizer as NAME@candidate")
    parser.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI (default as for train)")
    parser.add_argument("--no-tracking", action="store_true", help="do not track the search in MLflow")
    parser.set_defaults(handler=_tune, command="tune")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metaopt", description="Meta-train learned optimizers and compare them with hand-designed ones."
    )
    parser.add_argument("--version", action="version", version=f"metaopt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    evaluate = commands.add_parser(
        "evaluate",
        help="run optimizers side by side on held-out optimizees and report the comparison",
        description="Run the configured optimizers on held-out optimizees; write curves.parquet, "
        "summary.parquet, table.md and curves.png, and print the table.",
    )
    _add_config(evaluate)
    _add_run_options(evaluate)
    evaluate.set_defaults(handler=_evaluate)

    train = commands.add_parser(
        "train",
        help="meta-train a learned optimizer, then compare it with tuned hand-designed ones",
        description="Meta-train config.optimizer on config.task (truncated unrolls, Adam meta-steps), "
        "checkpointing under the run folder; then evaluate it against config.evaluate's optimizers.",
    )
    _add_config(train)
    add_train_options(train)

    tune = commands.add_parser(
        "tune",
        help="search the learned optimizer's architecture with Ray Tune; register the best",
        description="Run the search declared in CONFIG (jobs/configs/tune_*.yaml: a base training config, "
        "a space, a searcher and scheduler) on Ray; every trial meta-trains and reports its validation loss. "
        "Writes results.parquet and the best trial's comparison with the default architecture and the "
        "hand-designed baselines; tracks the search and its trials in MLflow; registers the best.",
    )
    _add_config(tune)
    add_tune_options(tune)

    benchmark = commands.add_parser(
        "benchmark",
        help="run learned optimizers and per-task tuned baselines on a suite of held-out tasks",
        description="Run every task of SUITE with each --optimizer and with Adam, AdamW and SGD with momentum\n"
        "tuned per task (a learning-rate grid, constant and cosine; cached), and report final losses,\n"
        "loss ratios, speedups and divergences: results.parquet, curves.parquet, results.md, speedup.png.\n"
        "A suite with `score: validation` trains real modules with the tuned AdamW, the tuning-free peers\n"
        "(schedule-free AdamW, Prodigy, AdamW warm-up + cosine) and each --optimizer, and scores held-out\n"
        "validation data: validation losses, metrics, validation speedups, validation_curves.png.\n"
        "Learned optimizers whose spec says they were selected on SUITE (its file name) are marked †.",
        epilog="example:\n  metaopt benchmark jobs/configs/suite_heldout.yaml \\\n"
        "    --optimizer phnn=runs/train/quadratic/checkpoints/best --optimizer models:/quadratic-phnn@latest",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    benchmark.add_argument("suite", help="suite YAML, e.g. jobs/configs/suite_heldout.yaml")
    benchmark.add_argument(
        "--optimizer",
        action="append",
        default=[],
        metavar="[NAME=]SOURCE",
        help="a learned optimizer: pretrained:NAME, checkpoint folder, models:/NAME@ALIAS, models:/NAME/VERSION or "
        "runs:/RUN_ID/... (repeatable; none: only the baselines run, filling the cache)",
    )
    benchmark.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="tuned baselines' cache (default: $METAOPT_CACHE_DIR/benchmark, else ~/.cache/metaopt/benchmark)",
    )
    benchmark.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI for models:/ and runs:/ sources")
    benchmark.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="torch threads (default 1: small models, and on a busy machine more threads wait on each other)",
    )
    _add_run_options(benchmark)
    benchmark.set_defaults(handler=_benchmark)

    sync = commands.add_parser(
        "sync",
        help="deliver a run's MLflow writes buffered while the tracking server was unreachable",
        description="Replay RUN_DIR/mlflow_buffer.jsonl to the run's tracking server.",
    )
    sync.add_argument("run_dir", metavar="RUN_DIR")
    sync.add_argument("--tracking-uri", metavar="URI", help="deliver to this server instead of the run's own")
    sync.set_defaults(handler=_sync)

    registry = commands.add_parser(
        "registry",
        help="register, list, show, promote and pull trained optimizers (MLflow Model Registry)",
        description="The MLflow Model Registry of trained optimizers; aliases, not stages.",
    )
    registry.add_argument(
        "--tracking-uri", metavar="URI", help="default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db"
    )
    actions = registry.add_subparsers(dest="action", required=True, metavar="ACTION")
    register = actions.add_parser(
        "register",
        help="register a meta-training run's best optimizer, a shipped one (pretrained:general) or a checkpoint",
    )
    register.add_argument("source", metavar="RUN_ID|pretrained:NAME|CHECKPOINT_DIR")
    register.add_argument("name", metavar="NAME")
    register.add_argument("--alias", help="alias for the new version, e.g. candidate")
    actions.add_parser("list", help="registered optimizers with their aliases")
    show = actions.add_parser("show", help="every version of NAME: aliases, tags, source run")
    show.add_argument("name", metavar="NAME")
    promote = actions.add_parser("promote", help="point ALIAS of NAME at VERSION")
    promote.add_argument("name", metavar="NAME")
    promote.add_argument("version", metavar="VERSION", type=int)
    promote.add_argument("alias", metavar="ALIAS")
    pull = actions.add_parser("pull", help="download an optimizer (weights + spec) into DIR")
    pull.add_argument("source", metavar="NAME@ALIAS|NAME/VERSION|models:/...|runs:/...")
    pull.add_argument("directory", metavar="DIR")
    registry.set_defaults(handler=_registry)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Runs a parsed command; a bad config, missing data or an unreachable server is one error line and exit 2."""
    try:
        return args.handler(args)
    except (ConfigError, DataNotFoundError, TaskFactoryError, CheckpointError, ConnectionError, LookupError) as error:
        print(f"metaopt {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
