"""Ray job entrypoint: meta-train a learned optimizer on the cluster this job runs in.

    ray job submit --working-dir . -- python jobs/meta_train.py \
        --config jobs/configs/train_quadratic_phnn.yaml --set distributed.workers=4

The options are ``metaopt train``'s (the same parser), with the config as ``--config``. The job's driver
joins its cluster (``--address`` defaults to ``auto``: RAY_ADDRESS, which Ray's job supervisor sets) and
prints a line per validation instead of progress bars. A config without a ``distributed`` section gets
the default one (2 workers, sync).
"""

from __future__ import annotations

import argparse
import sys

from metaopt.cli import add_train_options, run


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


if __name__ == "__main__":
    sys.exit(run(parse()))
