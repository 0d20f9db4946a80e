"""Ray job entrypoint: meta-train a learned optimizer on the cluster this job runs in.

    ray job submit --working-dir . -- python jobs/meta_train.py \
        --config jobs/configs/train_quadratic_phnn.yaml --set distributed.workers=4 \
        --output "$PWD/runs/train/quadratic-phnn" --tracking-uri "sqlite:///$PWD/mlflow.db"

The options are ``metaopt train``'s (the same parser), with the config as ``--config``. The job's driver
joins its cluster (``--address`` defaults to ``auto``: RAY_ADDRESS, which Ray's job supervisor sets) and
prints a line per validation instead of progress bars. A config without a ``distributed`` section gets
the default one (2 workers, sync). The run folder and the MLflow store must be absolute (or a server, or
``--no-tracking``): the job runs in a temporary copy of its working folder (metaopt/ray_jobs.py).
"""

from __future__ import annotations

import argparse
import sys

from metaopt.cli import add_train_options, run
from metaopt.config import load_config
from metaopt.ray_jobs import checked_first, require_lasting


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """This script's arguments, parsed as ``metaopt train CONFIG --address auto --no-progress ...`` would be."""
    parser = argparse.ArgumentParser(
        description="Meta-train on a Ray cluster: `metaopt train` as a Ray job, "
        "with --address auto (the job's cluster) and no progress bars."
    )
    parser.add_argument("--config", required=True, help="YAML config, e.g. jobs/configs/train_quadratic_phnn.yaml")
    add_train_options(parser)
    parser.set_defaults(address="auto", no_progress=True)
    return parser.parse_args(argv)


def check(args: argparse.Namespace) -> None:
    """Raises ConfigError unless the run folder and the MLflow store outlive the job (``require_lasting``)."""
    config = load_config(args.config, args.set)
    tracking = config.tracking
    require_lasting(
        args.resume or args.output or config.train.output_dir,
        args.tracking_uri or tracking.uri,
        tracking.enabled and not args.no_tracking,
    )


def main(argv: list[str] | None = None) -> int:
    """``metaopt train`` with this script's arguments, once ``check`` passes."""
    args = parse(argv)
    args.handler = checked_first(check, args.handler)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
