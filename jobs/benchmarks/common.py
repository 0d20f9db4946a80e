"""What every benchmark shares: the machine description, markdown tables and JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

DEFAULT_OUTPUT_DIR = Path("runs/benchmarks")


def off_initialisation(meta_params: dict[str, torch.Tensor], seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    """``meta_params`` plus seeded Gaussian noise (``scale`` · N(0, 1)): lstm and hnn_seed start with a
    zero read-out, which makes every update and every other meta-gradient zero, so checks of updates or
    meta-gradients at the initialisation itself would compare zeros (the benchmark's and the tests')."""
    generator = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=generator).to(v.device) for k, v in meta_params.items()}


def machine() -> dict:
    """Where the numbers come from."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    try:
        model = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
        info["processor"] = model.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        pass
    return info


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(call: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    """Wall-clock seconds of each of ``repeats`` calls (the device synchronised around each)."""
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        call()
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    return seconds


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """``columns``: (key, header, format spec); a missing or None value prints as —."""
    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = []
        for key, _, spec in columns:
            value = row.get(key)
            cells.append("—" if value is None else format(value, spec))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: str | Path, benchmark: str, settings: dict, rows: list[dict], **extra) -> Path:
    """Write ``{benchmark, machine, settings, rows, ...}`` to ``path`` and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": benchmark, "machine": machine(), "settings": settings, "rows": rows, **extra}
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path
