"""Optimizer step cost: ``metaopt.load_optimizer(...)`` vs ``torch.optim.Adam`` (foreach, fused).

Models are stacks of ``nn.Linear(width, width)`` with about 10^4, 10^6 and 10^7 parameters and
fixed random gradients; only ``optimizer.step()`` is timed (median of ``--repeats`` after
``--warmup`` steps). The learned optimizers are loaded from checkpoint folders through
``metaopt.load_optimizer`` (their untrained initialisation: the cost does not depend on the
weights; ``pretrained:general`` is the shipped optimizer, loaded as users load it): rows named by
kind run the batched update (``fused=False``), ``KIND (fused)`` rows the
one-pass step (``load_optimizer``'s default where it runs: the native C step of hnn_seed, phnn and lstm
on the CPU, phnn's Triton step on CUDA). State memory is the bytes of the distinct storages behind
``optimizer.state``; on CUDA the peak memory allocated during a step (above the model and its
gradients) is reported too.

    python -m jobs.benchmarks.optimizer_step [--quick] [--output runs/benchmarks/optimizer_step.json]
    python -m jobs.benchmarks.optimizer_step --device cuda   # the GPU rows: 1e6, 1e7 and 1e8 parameters
"""

from __future__ import annotations

import argparse
import gc
import tempfile
from pathlib import Path

import torch
from torch import nn

import metaopt
from jobs.benchmarks.common import DEFAULT_OUTPUT_DIR, markdown_table, median, resolve_device, time_calls, write_json
from metaopt.meta import save_checkpoint
from metaopt.meta.checkpoint import read_spec
from metaopt.optimizers import LEARNED, make_optimizer
from metaopt.tracking.registry import PRETRAINED_PREFIX, resolve_checkpoint

# parameters -> (width, layers) of the Linear stack
MODELS = {10**4: (100, 1), 10**6: (1000, 1), 10**7: (1000, 10), 10**8: (10000, 1)}
DEFAULT_SIZES = {"cpu": [10**4, 10**6, 10**7], "cuda": [10**6, 10**7, 10**8]}
LEARNED_KINDS = ("phnn", "hnn_seed", "lstm", "pretrained:general")


def make_model(size: int, device: torch.device) -> nn.Module:
    """A stack of Linear layers with about ``size`` parameters and seeded random gradients."""
    width, layers = MODELS[size]
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers))).to(device)
    for param in model.parameters():
        param.grad = (1e-3 * torch.randn(param.shape, generator=generator)).to(device)
    return model


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the distinct tensor storages in ``optimizer.state`` (views of one buffer count once)."""
    storages = {}
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def learned_checkpoint(kind: str, directory: Path) -> Path:
    """A checkpoint folder of ``kind`` at its initialisation (a ``pretrained:NAME`` as shipped), loadable by
    ``metaopt.load_optimizer``."""
    if kind.startswith(PRETRAINED_PREFIX):
        return resolve_checkpoint(kind)
    optimizer = make_optimizer(kind)
    return save_checkpoint(directory, 0, optimizer, optimizer.init_meta_params(0), name=kind)


def adam_variants(device: torch.device) -> dict:
    variants = {"adam (foreach)": dict(foreach=True)}
    variants["adam (fused)"] = dict(fused=True)  # CPU and CUDA in torch >= 2.4; skipped where refused
    return variants


def measure(name: str, build, size: int, device: torch.device, warmup: int, repeats: int) -> dict | None:
    """Step time and state memory of the optimizer ``build(params)`` on a fresh model of ``size``."""
    model = make_model(size, device)
    params = list(model.parameters())
    try:
        optimizer = build(params)
        for _ in range(warmup):
            optimizer.step()
    except (RuntimeError, ValueError) as error:  # e.g. fused Adam unsupported on this device
        print(f"  skipped {name} at {size:.0e}: {error}")
        return None
    row = {"optimizer": name, "params": sum(p.numel() for p in params), "device": device.type}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    row["step_ms"] = 1000 * median(time_calls(optimizer.step, repeats, device))
    row["state_mb"] = state_bytes(optimizer) / 2**20
    if device.type == "cuda":
        row["step_peak_extra_mb"] = (torch.cuda.max_memory_allocated(device) - baseline) / 2**20
    del optimizer, model, params
    gc.collect()
    return row


def run(
    sizes: list[int],
    kinds: list[str],
    compiled: list[str],
    device: torch.device,
    warmup: int,
    repeats: int,
    fused_only: frozenset[str] = frozenset(),
) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-step-") as scratch:
        checkpoints = {kind: learned_checkpoint(kind, Path(scratch)) for kind in set(kinds) | set(compiled)}
        for size in sizes:
            builders = {
                name: (lambda params, options=options: torch.optim.Adam(params, lr=1e-3, **options))
                for name, options in adam_variants(device).items()
            }
            for kind in kinds:
                if kind not in fused_only:
                    builders[kind] = lambda params, kind=kind: metaopt.load_optimizer(
                        checkpoints[kind], params, fused=False
                    )
                ops = LEARNED[read_spec(checkpoints[kind])["kind"]].fused_kernel
                if ops and (device.type == "cpu" or (device.type == "cuda" and ops.cuda)):
                    builders[f"{kind} (fused)"] = lambda params, kind=kind: metaopt.load_optimizer(
                        checkpoints[kind], params, fused=True
                    )
            for kind in compiled:
                builders[f"{kind} (compiled)"] = lambda params, kind=kind: metaopt.load_optimizer(
                    checkpoints[kind], params, compile=True
                )
            size_rows = [
                row
                for name, build in builders.items()
                if (row := measure(name, build, size, device, warmup, repeats)) is not None
            ]
            adam = next(row for row in size_rows if row["optimizer"] == "adam (foreach)")
            for row in size_rows:
                row["time_vs_adam_foreach"] = row["step_ms"] / adam["step_ms"]
                row["state_vs_adam"] = row["state_mb"] / adam["state_mb"]
                print(f"  {size:.0e} {row['optimizer']}: {row['step_ms']:.2f} ms", flush=True)
            rows += size_rows
    return rows


COLUMNS = [
    ("params", "parameters", ",d"),
    ("device", "device", ""),
    ("optimizer", "optimizer", ""),
    ("step_ms", "step (ms)", ".3g"),
    ("time_vs_adam_foreach", "× Adam foreach", ".2f"),
    ("state_mb", "state (MiB)", ".3g"),
    ("state_vs_adam", "state × Adam", ".2f"),
    ("step_peak_extra_mb", "peak extra in step (MiB, CUDA)", ".3g"),
]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="CPU-sized: batched lstm only up to 10^6 parameters (its fused step at every size), "
        "compiled phnn only at 10^6, fewer repeats",
    )
    p.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        choices=sorted(MODELS),
        help="default: 1e4, 1e6, 1e7 on CPU; 1e6, 1e7, 1e8 on CUDA",
    )
    p.add_argument("--kinds", nargs="+", choices=LEARNED_KINDS, default=list(LEARNED_KINDS))
    p.add_argument(
        "--compile",
        nargs="*",
        choices=LEARNED_KINDS,
        default=["phnn"],
        help="learned kinds also timed with compile=True (torch.compile)",
    )
    p.add_argument(
        "--device",
        nargs="+",
        default=["cpu", "auto"],
        help="devices to measure (auto: CUDA when present; duplicates are dropped)",
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, help="timed steps (default 5 quick, 20 full)")
    p.add_argument("--output", default=str(DEFAULT_OUTPUT_DIR / "optimizer_step.json"))
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = parser().parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 20)
    devices = list(dict.fromkeys(resolve_device(name) for name in args.device))
    rows = []
    for device in devices:
        for size in args.sizes or DEFAULT_SIZES[device.type]:
            # the batched lstm at 10^7 writes 3 GB gate tensors and takes minutes a step
            fused_only = frozenset({"lstm"} if args.quick and size > 10**6 and device.type == "cpu" else set())
            compiled = [k for k in args.compile if not (args.quick and size != 10**6)]
            rows += run([size], args.kinds, compiled, device, args.warmup, repeats, fused_only)
    print("\n## Optimizer step cost (median step) and state memory\n")
    print(markdown_table(rows, COLUMNS))
    path = write_json(
        args.output, "optimizer_step", {**vars(args), "devices": [str(d) for d in devices], "repeats": repeats}, rows
    )
    print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
