"""Task factories named by import path in the module-task tests (``module_tasks:small_cnn``)."""

from __future__ import annotations

import torch
from torch import nn

from metaopt.tasks import ModuleTaskSpec


def small_cnn() -> ModuleTaskSpec:
    """A two-layer CNN with batch norm on a synthetic 10-class problem of 8×8 images (class = the quadrant
    and sign of a bright blob), data drawn from a fixed seed."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (512,), generator=generator)
    images = 0.3 * torch.randn(512, 1, 8, 8, generator=generator)
    rows, cols = (labels % 4) // 2 * 4, labels % 2 * 4
    for i in range(512):
        images[i, 0, rows[i] : rows[i] + 4, cols[i] : cols[i] + 4] += 1.0 if labels[i] < 4 else -1.0
    images[labels >= 8] *= 3.0

    def model() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64, 10),
        )

    return ModuleTaskSpec(model=model, inputs=images, targets=labels, loss=nn.functional.cross_entropy)


def unreachable_data() -> ModuleTaskSpec:
    """A factory that fails, as one whose dataset cannot be fetched does."""
    raise RuntimeError("the dataset server did not answer")


def not_a_task() -> dict:
    """A factory that returns something other than a ``ModuleTaskSpec``."""
    return {"model": nn.Linear(2, 1)}
