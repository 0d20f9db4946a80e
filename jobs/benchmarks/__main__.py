"""Run the whole benchmark suite: ``python -m jobs.benchmarks [--quick] [--output-dir runs/benchmarks]``.

``--quick`` sizes every benchmark for a 2-core CPU machine (minutes); without it, the full sizes
meant for a GPU node. Each benchmark prints its markdown table and writes its JSON file into
``--output-dir``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jobs.benchmarks import meta_train_memory, meta_train_throughput, optimizer_step
from jobs.benchmarks.common import DEFAULT_OUTPUT_DIR

BENCHMARKS = {
    "meta_train_throughput": meta_train_throughput,
    "optimizer_step": optimizer_step,
    "meta_train_memory": meta_train_memory,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sizes for a 2-core CPU machine")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    parser.add_argument("--mnist-root", default="../shared/datasets", help="folder holding MNIST/raw/ (test split)")
    parser.add_argument("--output-dir", default=str(DEFAULT_OUTPUT_DIR))
    args = parser.parse_args()
    for name in args.only:
        argv = ["--output", str(Path(args.output_dir) / f"{name}.json")] + (["--quick"] if args.quick else [])
        if name != "optimizer_step":
            argv += ["--mnist-root", args.mnist_root]
        print(f"\n# {name}\n", flush=True)
        BENCHMARKS[name].main(argv)


if __name__ == "__main__":
    main()
