"""Meta-training throughput: the single-process trainer vs Ray with 1, 2, 4 RolloutWorkers.

Every setting trains the same optimizer on the same total batch of optimizees (``train.batch_size``,
split evenly among the workers) and is timed over ``--meta-steps`` meta-steps after one warm-up
step (no validation, no checkpoints). Prints a table and writes JSON:

    uv run python jobs/bench_meta_train.py [--config jobs/configs/train_quadratic_phnn.yaml]
        [--workers 1 2 4] [--meta-steps 30] [--address ADDRESS] [--output runs/bench/meta_train.json]

Without ``--address`` it starts a local Ray with all of this machine's CPUs. Each worker reserves
``--cpus-per-worker`` CPUs (default 1, one torch thread), or an equal share when more workers than
that fit; the single process uses every core. ``ray overhead`` is the share of a sync meta-step the
learner spends on anything but the slowest worker's unroll (broadcast, scheduling, gathering).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch
from tqdm.auto import tqdm

from metaopt.config import load_config
from metaopt.distributed import ray_workers
from metaopt.meta import MetaTrainer


def time_meta_steps(trainer: MetaTrainer, meta_steps: int, label: str) -> dict:
    trainer.meta_gradient_step()  # warm-up: first episode's sampling, worker start-up
    overheads, optimizee_steps = [], 0.0
    started = time.perf_counter()
    for _ in tqdm(range(meta_steps), desc=label, unit="meta-step", leave=False):
        metrics = trainer.meta_gradient_step()
        overheads.append(metrics.get("ray_overhead_fraction", float("nan")))
        optimizee_steps += metrics["optimizee_steps"]  # every particle's (ES, PES) and every worker's
    seconds = time.perf_counter() - started
    return {
        "setting": label,
        "meta_steps_per_s": meta_steps / seconds,
        "optimizee_steps_per_s": optimizee_steps / seconds,
        "seconds": seconds,
        "ray_overhead_fraction": statistics.fmean(overheads),
    }


def _percent(fraction: float) -> str:
    return "—" if fraction != fraction else f"{fraction:.1%}"  # NaN: no Ray round trip to measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="jobs/configs/train_quadratic_phnn.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--meta-steps", type=int, default=30)
    parser.add_argument("--address", help="Ray cluster (default: a local Ray on this machine)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--output", default="runs/bench/meta_train.json")
    args = parser.parse_args()

    base = load_config(args.config, args.set)
    base.require("optimizer", "train")
    ray.init(address=args.address, logging_level="WARNING")
    cpus = ray.cluster_resources().get("CPU", 1.0)
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="bench-meta-train-"))  # run folder; nothing is written there
    try:
        single = load_config(args.config, args.set)
        single.distributed = None
        rows.append(time_meta_steps(MetaTrainer(single, scratch), args.meta_steps, "single process"))
        for workers in args.workers:
            num_cpus = min(args.cpus_per_worker, cpus / workers)
            config = load_config(
                args.config, args.set + [f"distributed.workers={workers}", f"distributed.num_cpus={num_cpus:g}"]
            )
            with ray_workers(config) as group:
                trainer = MetaTrainer(config, scratch, gradient_source=group)
                rows.append(time_meta_steps(trainer, args.meta_steps, f"ray, {workers} worker(s)"))
    finally:
        ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)

    reference = rows[0]["optimizee_steps_per_s"]
    one_worker = next((r["optimizee_steps_per_s"] for r in rows if r["setting"] == "ray, 1 worker(s)"), None)
    for row in rows:
        row["speedup_vs_single_process"] = row["optimizee_steps_per_s"] / reference
        row["speedup_vs_one_worker"] = row["optimizee_steps_per_s"] / one_worker if one_worker else float("nan")
    train = base.train
    header = (
        f"{base.optimizer.kind} on {base.task.kind}, batch {train.batch_size}, unroll {train.unroll}, "
        f"estimator {train.estimator.kind}{' (second order)' if train.estimator.second_order else ''}; "
        f"{args.meta_steps} meta-steps; {os.cpu_count()} CPUs, torch {torch.__version__}, ray {ray.__version__}"
    )
    lines = [
        header,
        "",
        "| setting | optimizee steps/s | meta-steps/s | vs single process | vs 1 worker | ray overhead |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['setting']} | {r['optimizee_steps_per_s']:.0f} | {r['meta_steps_per_s']:.2f} | "
        f"{r['speedup_vs_single_process']:.2f}× | {r['speedup_vs_one_worker']:.2f}× | "
        f"{_percent(r['ray_overhead_fraction'])} |"
        for r in rows
    ]
    print("\n".join(lines))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        json.dumps(
            {
                "config": args.config,
                "overrides": args.set,
                "machine": platform.platform(),
                "cpus": os.cpu_count(),
                "torch": torch.__version__,
                "ray": ray.__version__,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
