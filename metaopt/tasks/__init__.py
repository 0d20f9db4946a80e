"""Optimizee task families."""

from __future__ import annotations

import numpy as np
import torch

from metaopt.tasks.base import Optimizees, Split, TaskFamily, optimizee_seeds
from metaopt.tasks.data import DataNotFoundError, mnist_half
from metaopt.tasks.mlp import MnistMLP
from metaopt.tasks.module import ModuleTask, ModuleTaskSpec, load_factory
from metaopt.tasks.quadratic import Quadratic


def make_task(config, half: Split, device: torch.device | str = "cpu", data=None) -> TaskFamily:
    """The task family a task config describes, on the ``half`` of its data (meta-train or meta-test);
    ``data``: that half already loaded (see ``task_data``), for tasks that read data."""
    if config.kind == "quadratic":
        return Quadratic(dim=config.dim, device=device)
    if config.kind == "mnist_mlp":
        return MnistMLP(
            activation=config.activation,
            hidden_sizes=config.hidden_sizes,
            batch_size=config.batch_size,
            root=config.data.root,
            split=config.data.split,
            download=config.data.download,
            half=half,
            device=device,
            data=data,
        )
    if config.kind == "module":
        return ModuleTask(load_factory(config.factory)(), config.batch_size, half, device)
    raise ValueError(f"unknown task kind {config.kind!r}; allowed: quadratic, mnist_mlp, module")


def task_data(config, half: Split) -> tuple[np.ndarray, np.ndarray] | None:
    """The ``half`` of a task's data as NumPy arrays (for Ray's object store), or None for tasks without data."""
    if config.kind != "mnist_mlp":
        return None
    pixels, labels = mnist_half(config.data.root, config.data.split, config.data.download, half)
    return pixels.numpy(), labels.numpy()


__all__ = [
    "DataNotFoundError",
    "MnistMLP",
    "ModuleTask",
    "ModuleTaskSpec",
    "Optimizees",
    "Quadratic",
    "Split",
    "TaskFamily",
    "make_task",
    "optimizee_seeds",
    "task_data",
]
