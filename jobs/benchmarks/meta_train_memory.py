"""Meta-training memory: peak memory of one truncated-backprop meta-gradient vs unroll length on
the MNIST task, with and without activation checkpointing of the unroll.

Every (unroll, checkpointing) configuration runs in a fresh subprocess, so one's peak never hides
another's. On CPU the peak is the process's maximum resident set size (``VmHWM`` in ``/proc/self/status``)
minus its resident set just before the unroll (after importing torch, loading MNIST and sampling
the optimizees); on CUDA it is ``torch.cuda.max_memory_allocated`` above the memory allocated
before the unroll. The checkpointed and plain runs of each unroll must give the same
meta-gradient (their norms are compared), else the benchmark stops.

    python -m jobs.benchmarks.meta_train_memory [--quick] [--output runs/benchmarks/meta_train_memory.json]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
from pathlib import Path

import torch

from jobs.benchmarks.common import DEFAULT_OUTPUT_DIR, markdown_table, resolve_device, write_json
from metaopt.meta import TruncatedBackprop
from metaopt.optimizers import make_optimizer
from metaopt.tasks import MnistMLP, optimizee_seeds

UNROLLS = (10, 20, 50, 100)


def resident_mb() -> float:
    """This process's current resident set size."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_resident_mb() -> float:
    """This process's peak resident set size (VmHWM; unlike getrusage's ru_maxrss, it starts afresh at
    exec instead of inheriting the parent's peak)."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024  # kB


def measure_one(
    unroll: int, checkpoint_steps: int, optimizees: int, kind: str, mnist_root: str, device: torch.device
) -> dict:
    """Peak memory of one meta-gradient over an ``unroll``-step truncation (run in a fresh process)."""
    family = MnistMLP(root=mnist_root, split="test", download=False, device=device)
    optimizer = make_optimizer(kind)
    estimator = TruncatedBackprop(
        family,
        optimizer,
        seeds=lambda episode: optimizee_seeds(0, optimizees, "meta_train", stream=episode),
        unroll_length=unroll,
        episode_length=unroll,
        checkpoint_steps=checkpoint_steps,
    )
    meta_params = {k: v.to(device) for k, v in optimizer.init_meta_params(0).items()}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device) / 2**20
    else:
        baseline = resident_mb()
    estimate = estimator.estimate(meta_params)
    grad_norm = math.sqrt(sum(float(g.double().square().sum()) for g in estimate.grads.values()))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        total = peak
    else:
        total = peak_resident_mb()
        peak = total
    return {
        "unroll": unroll,
        "checkpoint_steps": checkpoint_steps,
        "checkpointing": checkpoint_steps > 0,
        "optimizees": optimizees,
        "optimizer": kind,
        "device": device.type,
        "peak_total_mb": total,
        "peak_above_baseline_mb": peak - baseline,
        "baseline_mb": baseline,
        "meta_grad_norm": grad_norm,
        "meta_loss": estimate.meta_loss,
    }


def measure_in_subprocess(unroll: int, checkpoint_steps: int, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        "-m",
        "jobs.benchmarks.meta_train_memory",
        "--one",
        str(unroll),
        str(checkpoint_steps),
        "--optimizees",
        str(args.optimizees),
        "--kind",
        args.kind,
        "--mnist-root",
        args.mnist_root,
        "--device",
        args.device,
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement failed ({' '.join(command)}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_same_meta_gradient(rows: list[dict], rtol: float = 1e-4) -> None:
    """Checkpointed and plain runs of every unroll agree on the meta-gradient (norm) and loss."""
    for unroll in {row["unroll"] for row in rows}:
        plain, checkpointed = (
            next(r for r in rows if r["unroll"] == unroll and r["checkpointing"] == on) for on in (False, True)
        )
        for key in ("meta_grad_norm", "meta_loss"):
            if not math.isclose(plain[key], checkpointed[key], rel_tol=rtol):
                raise AssertionError(
                    f"unroll {unroll}: checkpointing changed {key} ({plain[key]!r} vs {checkpointed[key]!r})"
                )


COLUMNS = [
    ("unroll", "unroll", "d"),
    ("checkpointing", "checkpointing", ""),
    ("checkpoint_steps", "chunk (steps)", "d"),
    ("peak_above_baseline_mb", "peak above baseline (MiB)", ",.0f"),
    ("peak_total_mb", "peak total (MiB)", ",.0f"),
    ("vs_unroll_20", "× unroll 20 (same setting)", ".2f"),
]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CPU-sized: 2 optimizees instead of 16")
    p.add_argument("--unrolls", type=int, nargs="+", default=list(UNROLLS))
    p.add_argument("--checkpoint-steps", type=int, default=5, help="chunk length when checkpointing")
    p.add_argument("--optimizees", type=int, help="MNIST optimizees (default 2 quick, 16 full)")
    p.add_argument("--kind", default="phnn", choices=["phnn", "hnn_seed", "lstm"])
    p.add_argument("--mnist-root", default="../shared/datasets", help="folder holding MNIST/raw/ (test split)")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--one", type=int, nargs=2, metavar=("UNROLL", "CHECKPOINT_STEPS"), help=argparse.SUPPRESS
    )  # internal: measure one configuration in this process
    p.add_argument("--output", default=str(DEFAULT_OUTPUT_DIR / "meta_train_memory.json"))
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = parser().parse_args(argv)
    args.optimizees = args.optimizees or (2 if args.quick else 16)
    if args.one:
        print(
            json.dumps(measure_one(*args.one, args.optimizees, args.kind, args.mnist_root, resolve_device(args.device)))
        )
        return []
    rows = []
    for checkpoint_steps in (0, args.checkpoint_steps):
        for unroll in args.unrolls:
            rows.append(measure_in_subprocess(unroll, checkpoint_steps, args))
            print(
                f"  unroll {unroll} checkpoint {checkpoint_steps}: {rows[-1]['peak_above_baseline_mb']:.0f} MiB",
                flush=True,
            )
    check_same_meta_gradient(rows)
    for row in rows:
        reference = next((r for r in rows if r["unroll"] == 20 and r["checkpointing"] == row["checkpointing"]), None)
        row["vs_unroll_20"] = row["peak_above_baseline_mb"] / reference["peak_above_baseline_mb"] if reference else None
    device = rows[0]["device"]
    print(f"\n## Meta-training memory, MNIST {args.kind}, {args.optimizees} optimizees, one meta-gradient ({device})\n")
    print(markdown_table(rows, COLUMNS))
    path = write_json(args.output, "meta_train_memory", vars(args), rows)
    print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
