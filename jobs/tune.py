"""Ray job entrypoint: search a learned optimizer's architecture with Ray Tune on this job's cluster.

    ray job submit --working-dir . -- python jobs/tune.py \
        --config jobs/configs/tune_quadratic_phnn.yaml --samples 32 \
        --output "$PWD/runs/tune/quadratic-phnn" --tracking-uri "sqlite:///$PWD/mlflow.db"

The options are ``metaopt tune``'s (the same parser), with the search config as ``--config``. The job's
driver joins its cluster (``--address`` defaults to ``auto``: RAY_ADDRESS, which Ray's job supervisor
sets) and shows no progress bars. The search folder and the MLflow store must be absolute (or a server, or
``--no-tracking``): the job runs in a temporary copy of its working folder (metaopt/ray_jobs.py).
"""

from __future__ import annotations

import argparse
import sys

from metaopt.cli import add_tune_options, run
from metaopt.ray_jobs import checked_first, require_lasting


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """This script's arguments, parsed as ``metaopt tune CONFIG --address auto --no-progress ...`` would be."""
    parser = argparse.ArgumentParser(
        description="Architecture search on a Ray cluster: `metaopt tune` as a Ray job, "
        "with --address auto (the job's cluster) and no progress bars."
    )
    parser.add_argument("--config", required=True, help="search YAML, e.g. jobs/configs/tune_quadratic_phnn.yaml")
    add_tune_options(parser)
    parser.set_defaults(address="auto", no_progress=True)
    return parser.parse_args(argv)


def check(args: argparse.Namespace) -> None:
    """Raises ConfigError unless the search folder and the MLflow store outlive the job (``require_lasting``)."""
    from metaopt.tune import load_search  # as metaopt tune does: it sets Ray's worker environment

    space = load_search(args.config, args.set)
    tracking = space.config.tracking
    require_lasting(
        args.resume or args.output or space.spec.search.output_dir,
        args.tracking_uri or tracking.uri,
        tracking.enabled and not args.no_tracking,
    )


def main(argv: list[str] | None = None) -> int:
    """``metaopt tune`` with this script's arguments, once ``check`` passes."""
    args = parse(argv)
    args.handler = checked_first(check, args.handler)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
