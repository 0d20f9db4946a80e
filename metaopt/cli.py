"""The ``metaopt`` command."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from metaopt import __version__
from metaopt.config import ConfigError, DistributedConfig, load_config
from metaopt.meta.checkpoint import CheckpointError
from metaopt.tasks import DataNotFoundError


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
    from metaopt.evaluate import Candidate, default_output_dir, run_evaluation
    from metaopt.meta import MetaTrainer, load_checkpoint

    config = load_config(args.config, args.set)
    config.require("optimizer", "train", "evaluate")
    if args.address and config.distributed is None:
        config.distributed = DistributedConfig()
    if args.resume:
        resume = Path(args.resume)
        run_dir = resume.parent.parent if (resume / "spec.json").exists() else resume
    else:
        run_dir = Path(args.output) if args.output else default_output_dir(config, Path(args.config).stem, "train")
    with _gradient_source(config, args.address) as source:
        trainer = MetaTrainer(config, run_dir, gradient_source=source)
        if args.resume:
            trainer.resume(Path(args.resume))
            print(f"metaopt train: resuming {run_dir} at meta-step {trainer.meta_step}")
        where = (f"on Ray with {config.distributed.workers} {config.distributed.mode} worker(s)"
                 if source else "in this process")
        print(f"metaopt train: {config.optimizer.kind} ({trainer.optimizer.num_meta_params()} meta-parameters) "
              f"on {config.task.kind} {where}; writing to {run_dir}")
        checkpoint = trainer.train(show_progress=not args.no_progress,
                                   on_metrics=_print_validation if args.no_progress else None)
    print(f"final checkpoint: {checkpoint}")

    _, best_params, best_spec = load_checkpoint(trainer.best_checkpoint)
    print(f"best checkpoint: {trainer.best_checkpoint} (meta-step {best_spec['meta_step']}, "
          f"validation loss {trainer.best_heldout:.4g})")
    learned = config.optimizer.kind
    on_device = lambda params: {k: v.to(trainer.device) for k, v in params.items()}  # noqa: E731
    leading = [
        Candidate(learned, lambda lr: trainer.optimizer, meta_params=on_device(best_params)),
        Candidate(f"{learned} (untrained)", lambda lr: trainer.optimizer,
                  meta_params=on_device(trainer.optimizer.init_meta_params(config.train.seed))),
    ]
    title = (f"{config.task.kind}: {learned} (best of {trainer.meta_step} meta-steps) vs hand-designed, "
             f"{config.evaluate.runs} held-out runs")
    _, table = run_evaluation(config, run_dir / "evaluation", not args.no_progress, leading, title)
    print(table)
    print(f"results: {run_dir} (checkpoints/, metrics.parquet, evaluation/)")
    return 0


def _print_validation(meta_step: int, metrics: dict[str, float]) -> None:
    """Without a progress bar (e.g. in a Ray job's log), a line per validation."""
    if "heldout_loss" in metrics:
        print(f"meta-step {meta_step}: meta-loss {metrics['meta_loss']:.4g}, validation loss "
              f"{metrics['heldout_loss']:.4g}, {metrics['optimizee_steps_per_s']:.0f} optimizee steps/s", flush=True)


def _gradient_source(config, address: str | None):
    """Ray RolloutWorkers when the config has a ``distributed`` section, else the in-process estimator."""
    if config.distributed is None:
        return contextlib.nullcontext(None)
    from metaopt.distributed import ray_workers

    return ray_workers(config, address)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config, e.g. jobs/configs/quadratic.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set evaluate.runs=10 (repeatable)")
    parser.add_argument("--output", metavar="DIR", help="output folder (default: <output_dir>/<config>-<time>)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metaopt", description="Meta-train learned optimizers and compare them with hand-designed ones."
    )
    parser.add_argument("--version", action="version", version=f"metaopt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    evaluate = commands.add_parser(
        "evaluate", help="run optimizers side by side on held-out optimizees and report the comparison",
        description="Run the configured optimizers on held-out optimizees; write curves.parquet, "
        "summary.parquet, table.md and curves.png, and print the table.",
    )
    _add_common(evaluate)
    evaluate.set_defaults(handler=_evaluate)

    train = commands.add_parser(
        "train", help="meta-train a learned optimizer, then compare it with tuned hand-designed ones",
        description="Meta-train config.optimizer on config.task (truncated unrolls, Adam meta-steps), "
        "checkpointing under the run folder; then evaluate it against config.evaluate's optimizers.",
    )
    _add_common(train)
    train.add_argument("--resume", metavar="PATH", help="continue a run folder (its latest checkpoint) or a checkpoint folder")
    train.add_argument("--address", metavar="ADDRESS",
                       help="Ray cluster to meta-train on (default: distributed.address, RAY_ADDRESS, a running "
                       "`ray start` cluster, else a local Ray); implies a distributed section")
    train.set_defaults(handler=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, DataNotFoundError, CheckpointError, ConnectionError) as error:
        print(f"metaopt {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
