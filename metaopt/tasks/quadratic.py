"""Random quadratics, the L2L/OPT-ML benchmark: f(θ) = ‖Wθ − y‖², W, y ~ N(0, 1), θ₀ = 0."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from metaopt.tasks.base import Optimizees, TaskFamily, seeded_generator


class Quadratic(TaskFamily):
    """f(θ) = ‖Wθ − y‖² with W ∈ R^{dim×dim}, y ∈ R^{dim} redrawn for every optimizee."""

    name = "quadratic"

    def __init__(self, dim: int = 10, device: torch.device | str = "cpu"):
        super().__init__(device)
        self.dim = dim
        self.num_params = dim

    def sample(self, seeds: Sequence[int]) -> Optimizees:
        ws, ys = [], []
        for seed in seeds:  # setup only: the optimization itself is one batched computation
            generator = seeded_generator(seed)
            ws.append(torch.randn(self.dim, self.dim, generator=generator))
            ys.append(torch.randn(self.dim, generator=generator))
        return Optimizees(
            seeds=torch.tensor(list(seeds), dtype=torch.int64, device=self.device),
            params=torch.zeros(len(ws), self.dim, device=self.device),
            data={"W": torch.stack(ws).to(self.device), "y": torch.stack(ys).to(self.device)},
        )

    def loss(self, params: Tensor, data: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        residual = data["W"] @ params - data["y"]
        return (residual * residual).sum()

    def spec(self) -> dict:
        return {**super().spec(), "dim": self.dim}
