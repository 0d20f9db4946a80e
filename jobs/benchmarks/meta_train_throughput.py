"""Meta-training throughput: metaopt's MetaTrainer vs an L2L-style reference loop.

For every (task, optimizer) both start from the same meta-parameters and the same optimizees;
first their meta-gradients for the first truncation must agree (``torch.allclose`` with
``--rtol`` and an absolute tolerance of ``--atol-scale`` times the largest reference entry), else
the benchmark stops. Summing in another order changes float32 results, and 20 second-order steps
amplify that (phnn on the quadratic: 1.4e-3 of the largest entry), so where float32 disagrees the
check is repeated in float64, where the two must agree to 1e-9; the table shows both errors. Then
each takes ``--meta-steps`` timed meta-steps (meta-gradient, clip, Adam). The settings come from
the shipped training configs (``jobs/configs/train_*``: optimizer options, unroll, first or second
order), with 128 quadratic and 16 MNIST optimizees.

    python -m jobs.benchmarks.meta_train_throughput [--quick] [--output runs/benchmarks/meta_train_throughput.json]
"""

from __future__ import annotations

import argparse
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from jobs.benchmarks.common import (
    DEFAULT_OUTPUT_DIR,
    markdown_table,
    median,
    off_initialisation,
    resolve_device,
    time_calls,
    write_json,
)
from jobs.benchmarks.reference import ReferenceTrainer
from metaopt.config import Config, apply_overrides, validate_config
from metaopt.meta import MetaTrainer
from metaopt.optimizers import MetaParams

CONFIGS = {
    "quadratic": "jobs/configs/train_quadratic_{kind}.yaml",
    "mnist": "jobs/configs/train_mnist_sigmoid_{kind}.yaml",
}
BATCH_SIZES = {"quadratic": 128, "mnist": 16}
KINDS = ("phnn", "hnn_seed", "lstm")


FLOAT64_RTOL = 1e-9  # the float64 recheck: relative, and absolute in units of the largest entry


class GradientMismatch(AssertionError):
    """Our trainer and the reference loop disagree on the meta-gradient (``error``: the largest
    difference relative to the largest reference entry)."""

    def __init__(self, message: str, error: float):
        super().__init__(message)
        self.error = error


def benchmark_config(
    task: str,
    kind: str,
    device: torch.device,
    unroll: int | None = None,
    batch_size: int | None = None,
    mnist_root: str | None = None,
) -> Config:
    """The shipped training config of ``kind`` on ``task``, single process on ``device``."""
    overrides = [f"train.batch_size={batch_size or BATCH_SIZES[task]}", f"device={device.type}"]
    if unroll is not None:
        overrides += [f"train.unroll={unroll}"]
    if mnist_root is not None and task == "mnist":
        overrides += [f"task.data.root={mnist_root}", "task.data.split=test", "task.data.download=false"]
    data = yaml.safe_load(Path(CONFIGS[task].format(kind=kind)).read_text())
    data.pop("distributed", None)
    data["tracking"] = {"enabled": False}
    return validate_config(apply_overrides(data, overrides), source=CONFIGS[task].format(kind=kind))


def flat(params: MetaParams) -> torch.Tensor:
    return torch.cat([v.detach().reshape(-1).cpu() for v in params.values()])


def check_same_meta_gradient(
    config: Config, meta_params: MetaParams, device: torch.device, rtol: float, atol_scale: float, run_dir: Path
) -> tuple[MetaTrainer, ReferenceTrainer, float]:
    """Both trainers at ``meta_params`` on the same first truncation; raise ``GradientMismatch``
    unless their meta-gradients agree. Returns both trainers (one truncation in) and the largest
    absolute difference relative to the largest reference entry."""
    ours, reference = trainers(config, meta_params, device, run_dir)
    ours_grad = flat(ours.estimator.estimate({k: v.detach() for k, v in ours.meta_params.items()}).grads)
    reference_grad = flat(reference.meta_gradient()[0])
    scale = float(reference_grad.abs().max())
    error = float((ours_grad - reference_grad).abs().max()) / max(scale, 1e-30)
    if not torch.allclose(ours_grad, reference_grad, rtol=rtol, atol=atol_scale * scale):
        raise GradientMismatch(
            f"{config.optimizer.kind} on {config.task.kind} ({ours_grad.dtype}): meta-gradients differ "
            f"(max |Δ| / max |ref| = {error:.2e}, rtol {rtol}, atol {atol_scale} × max |ref|)",
            error,
        )
    return ours, reference, error


def trainers(
    config: Config, meta_params: MetaParams, device: torch.device, run_dir: Path
) -> tuple[MetaTrainer, ReferenceTrainer]:
    """Ours (run folder ``run_dir``, which timing never writes to) and the reference, both at ``meta_params``."""
    ours = MetaTrainer(config, run_dir)
    with torch.no_grad():
        for name, value in ours.meta_params.items():
            value.copy_(meta_params[name])
    return ours, ReferenceTrainer(config, meta_params, device)


@contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@dataclass
class Timing:
    meta_steps_per_s: float
    optimizee_steps_per_s: float


def time_meta_steps(step, meta_steps: int, optimizee_steps_per_meta_step: int, device: torch.device) -> Timing:
    """Throughput from the median of ``meta_steps`` individually timed meta-steps (robust to a
    shared, busy CPU)."""
    seconds = median(time_calls(step, meta_steps, device))
    return Timing(1 / seconds, optimizee_steps_per_meta_step / seconds)


def run(
    task: str,
    kind: str,
    device: torch.device,
    meta_steps: int,
    reference_meta_steps: int,
    unroll: int | None,
    rtol: float,
    atol_scale: float,
    mnist_root: str | None = None,
    batch_size: int | None = None,
) -> dict:
    """One row: both trainers checked, then timed."""
    config = benchmark_config(task, kind, device, unroll, batch_size, mnist_root)
    seed = config.train.seed
    meta_params = off_initialisation(config.optimizer.build().init_meta_params(seed), seed)
    error_float64 = None
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        run_dir = Path(scratch)
        try:
            ours, reference, error = check_same_meta_gradient(config, meta_params, device, rtol, atol_scale, run_dir)
        except GradientMismatch as mismatch:
            error = mismatch.error
            with default_dtype(torch.float64):
                double = off_initialisation(config.optimizer.build().init_meta_params(seed), seed)
                _, _, error_float64 = check_same_meta_gradient(
                    config, double, device, FLOAT64_RTOL, FLOAT64_RTOL, run_dir
                )
            ours, reference = trainers(config, meta_params, device, run_dir)
        train = config.train
        per_meta_step = train.unroll * train.batch_size
        ours_timing = time_meta_steps(ours.meta_gradient_step, meta_steps, per_meta_step, device)
        reference_timing = time_meta_steps(reference.meta_gradient_step, reference_meta_steps, per_meta_step, device)
    return {
        "task": task,
        "optimizer": kind,
        "optimizees": train.batch_size,
        "unroll": train.unroll,
        "second_order": train.estimator.second_order,
        "meta_steps_timed": meta_steps,
        "reference_meta_steps_timed": reference_meta_steps,
        "gradient_max_rel_error": error,
        "gradient_max_rel_error_float64": error_float64,
        "ours_meta_steps_per_s": ours_timing.meta_steps_per_s,
        "ours_optimizee_steps_per_s": ours_timing.optimizee_steps_per_s,
        "reference_meta_steps_per_s": reference_timing.meta_steps_per_s,
        "reference_optimizee_steps_per_s": reference_timing.optimizee_steps_per_s,
        "speedup": ours_timing.optimizee_steps_per_s / reference_timing.optimizee_steps_per_s,
    }


COLUMNS = [
    ("task", "task", ""),
    ("optimizer", "optimizer", ""),
    ("optimizees", "optimizees", "d"),
    ("unroll", "unroll", "d"),
    ("second_order", "2nd order", ""),
    ("gradient_max_rel_error", "grad rel. err", ".1e"),
    ("gradient_max_rel_error_float64", "float64 recheck", ".1e"),
    ("ours_optimizee_steps_per_s", "ours: optimizee steps/s", ",.0f"),
    ("ours_meta_steps_per_s", "ours: meta-steps/s", ".3g"),
    ("reference_optimizee_steps_per_s", "reference: optimizee steps/s", ",.0f"),
    ("reference_meta_steps_per_s", "reference: meta-steps/s", ".3g"),
    ("speedup", "speedup", ".1f"),
]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="CPU-sized: MNIST unroll 5 instead of the configs' 20; 3 timed meta-steps of ours, 1 of the reference",
    )
    p.add_argument("--tasks", nargs="+", choices=sorted(CONFIGS), default=["quadratic", "mnist"])
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--meta-steps", type=int, help="timed meta-steps of ours (default 3 quick, 10 full)")
    p.add_argument(
        "--reference-meta-steps", type=int, help="timed meta-steps of the reference (default 1 quick, 3 full)"
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument(
        "--mnist-root", default="../shared/datasets", help="folder holding MNIST/raw/ (the test split is used)"
    )
    p.add_argument("--rtol", type=float, default=1e-3)
    p.add_argument("--atol-scale", type=float, default=1e-5)
    p.add_argument("--output", default=str(DEFAULT_OUTPUT_DIR / "meta_train_throughput.json"))
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = parser().parse_args(argv)
    device = resolve_device(args.device)
    torch.set_flush_denormal(True)  # MetaTrainer sets it; the reference gets it too, so only batching differs
    meta_steps = args.meta_steps or (3 if args.quick else 10)
    reference_meta_steps = args.reference_meta_steps or (1 if args.quick else 3)
    rows = []
    for task in args.tasks:
        unroll = 5 if args.quick and task == "mnist" else None
        for kind in args.kinds:
            rows.append(
                run(
                    task,
                    kind,
                    device,
                    meta_steps,
                    reference_meta_steps,
                    unroll,
                    args.rtol,
                    args.atol_scale,
                    args.mnist_root,
                )
            )
            print(f"  {task} {kind}: {rows[-1]['speedup']:.1f}x", flush=True)
    print("\n## Meta-training throughput (ours vs the L2L-style reference loop; median meta-step)\n")
    print(markdown_table(rows, COLUMNS))
    path = write_json(args.output, "meta_train_throughput", {**vars(args), "device": str(device)}, rows)
    print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
