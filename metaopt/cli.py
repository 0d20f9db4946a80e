"""The ``metaopt`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from metaopt import __version__
from metaopt.config import ConfigError, load_config
from metaopt.tasks import DataNotFoundError


def _evaluate(args: argparse.Namespace) -> int:
    from metaopt.evaluate import default_output_dir, run_evaluation

    config = load_config(args.config, args.set)
    output_dir = Path(args.output) if args.output else default_output_dir(config, Path(args.config).stem)
    print(f"metaopt evaluate: writing to {output_dir}")
    _, table = run_evaluation(config, output_dir, show_progress=not args.no_progress)
    print(table)
    print(f"results: {output_dir} (curves.parquet, summary.parquet, table.md, curves.png)")
    return 0


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
    evaluate.add_argument("config", help="YAML config, e.g. jobs/configs/quadratic.yaml")
    evaluate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="override a config value, e.g. --set evaluate.runs=10 (repeatable)")
    evaluate.add_argument("--output", metavar="DIR", help="output folder (default: evaluate.output_dir/<config>-<time>)")
    evaluate.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    evaluate.set_defaults(handler=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, DataNotFoundError) as error:
        print(f"metaopt {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
