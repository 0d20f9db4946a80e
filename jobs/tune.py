"""Ray job entrypoint: search a learned optimizer's architecture with Ray Tune on this job's cluster.

    ray job submit --working-dir . -- python jobs/tune.py \
        --config jobs/configs/tune_quadratic_phnn.yaml --samples 32

The options are ``metaopt tune``'s (the same parser), with the search config as ``--config``. The job's
driver joins its cluster (``--address`` defaults to ``auto``: RAY_ADDRESS, which Ray's job supervisor
sets) and shows no progress bars.
"""

from __future__ import annotations

import argparse
import sys

from metaopt.cli import add_tune_options, run


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


if __name__ == "__main__":
    sys.exit(run(parse()))
