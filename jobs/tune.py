"""Ray job entrypoint: search a learned optimizer's architecture with Ray Tune on this job's cluster.

    ray job submit --working-dir . -- python jobs/tune.py \
        --config jobs/configs/tune_quadratic_phnn.yaml --samples 32

The job's driver joins its cluster (``--address auto``: RAY_ADDRESS, which Ray's job supervisor
sets). The options are those of ``metaopt tune``.
"""

from __future__ import annotations

import argparse
import sys

from metaopt.cli import main


def parse(argv: list[str] | None = None) -> list[str]:
    """This script's arguments as the equivalent ``metaopt tune`` command line."""
    parser = argparse.ArgumentParser(description="Architecture search on a Ray cluster (a `metaopt tune` wrapper "
                                     "for Ray jobs).")
    parser.add_argument("--config", required=True, help="search YAML, e.g. jobs/configs/tune_quadratic_phnn.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a search value, e.g. search.samples=8 or set.train.meta_steps=100")
    parser.add_argument("--samples", type=int, metavar="N", help="trials to run")
    parser.add_argument("--output", metavar="DIR", help="search folder (default: search.output_dir/<config>-<time>)")
    parser.add_argument("--resume", metavar="DIR", help="continue an interrupted search")
    parser.add_argument("--register", metavar="NAME", help="register the best optimizer as NAME@candidate")
    parser.add_argument("--address", default="auto", help="Ray cluster address (default: auto, the job's own)")
    args = parser.parse_args(argv)
    command = ["tune", args.config, "--no-progress", "--address", args.address]
    command += [f"--set={override}" for override in args.set]
    command += ["--samples", str(args.samples)] if args.samples else []
    command += ["--output", args.output] if args.output else []
    command += ["--resume", args.resume] if args.resume else []
    command += ["--register", args.register] if args.register else []
    return command


if __name__ == "__main__":
    sys.exit(main(parse()))
