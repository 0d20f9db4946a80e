"""Optimizee task families."""

from __future__ import annotations

import torch

from metaopt.tasks.base import Optimizees, Split, TaskFamily, optimizee_seeds
from metaopt.tasks.data import DataNotFoundError
from metaopt.tasks.mlp import MnistMLP
from metaopt.tasks.quadratic import Quadratic


def make_task(config, half: Split, device: torch.device | str = "cpu") -> TaskFamily:
    """The task family a task config describes, on the ``half`` of its data (meta-train or meta-test)."""
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
        )
    raise ValueError(f"unknown task kind {config.kind!r}; allowed: quadratic, mnist_mlp")


__all__ = [
    "DataNotFoundError", "MnistMLP", "Optimizees", "Quadratic", "Split", "TaskFamily",
    "make_task", "optimizee_seeds",
]
