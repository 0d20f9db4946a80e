"""Ray job entrypoint: meta-train a learned optimizer on the cluster this job runs in.

    ray job submit --working-dir . -- python jobs/meta_train.py \
        --config jobs/configs/train_quadratic_phnn.yaml --set distributed.workers=4

The job's driver joins its cluster (``--address auto``: RAY_ADDRESS, which Ray's job supervisor
sets). The options are those of ``metaopt train``; a config without a ``distributed`` section
gets the default one (2 workers, sync).
"""

from __future__ import annotations

import argparse
import sys

from metaopt.cli import main


def parse(argv: list[str] | None = None) -> list[str]:
    """This script's arguments as the equivalent ``metaopt train`` command line."""
    parser = argparse.ArgumentParser(description="Meta-train on a Ray cluster (a `metaopt train` wrapper for Ray jobs).")
    parser.add_argument("--config", required=True, help="YAML config, e.g. jobs/configs/train_quadratic_phnn.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    parser.add_argument("--output", metavar="DIR", help="run folder (default: train.output_dir/<config>-<time>)")
    parser.add_argument("--resume", metavar="PATH", help="continue a run folder or checkpoint")
    parser.add_argument("--address", default="auto", help="Ray cluster address (default: auto, the job's own)")
    args = parser.parse_args(argv)
    command = ["train", args.config, "--no-progress", "--address", args.address]
    command += [f"--set={override}" for override in args.set]
    command += ["--output", args.output] if args.output else []
    command += ["--resume", args.resume] if args.resume else []
    return command


if __name__ == "__main__":
    sys.exit(main(parse()))
