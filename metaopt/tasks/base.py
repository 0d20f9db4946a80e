"""Optimizee task families: many optimizee instances of one family run as one batched computation.

A family samples optimizees from integer seeds (one seed, one optimizee: its data, its initial
parameters and its minibatch stream). ``loss`` is written for a single optimizee on flat
parameters; ``batched_loss`` maps it over a batch with ``torch.func.vmap``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor

Split = Literal["meta_train", "meta_test"]


@dataclass
class Optimizees:
    """A batch of ``B`` optimizee instances of one family."""

    seeds: Tensor  # [B] int64, one per optimizee; keys its minibatch stream
    params: Tensor  # [B, n] initial flat parameters
    data: dict[str, Tensor] = field(default_factory=dict)  # per-optimizee tensors, leading dim B

    def __len__(self) -> int:
        return self.seeds.shape[0]


def optimizee_seeds(seed: int, count: int, split: Split, stream: int = 0) -> list[int]:
    """``count`` optimizee seeds of ``stream`` (e.g. an episode index); meta-train seeds are even
    and meta-test seeds odd, so the two splits never share an optimizee."""
    rng = np.random.default_rng([seed, 0 if split == "meta_train" else 1, stream])
    halves = rng.integers(0, 2**30, size=count)
    return [int(2 * h + (split == "meta_test")) for h in halves]


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator for ``seed``: sampling happens on CPU so every device sees the same draws."""
    return torch.Generator().manual_seed(seed)


class TaskFamily(ABC):
    """A family of optimizee tasks with flat parameters of size ``num_params``."""

    name: str
    num_params: int

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    @abstractmethod
    def sample(self, seeds: Sequence[int]) -> Optimizees:
        """One optimizee per seed: its data and initial parameters."""

    @abstractmethod
    def loss(self, params: Tensor, data: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        """Scalar loss of ONE optimizee: flat ``params`` [n], its ``data`` and minibatch ``batch``."""

    def batch(self, optimizees: Optimizees, step: int) -> dict[str, Tensor]:
        """Each optimizee's minibatch at ``step`` (leading dim B); empty for deterministic tasks."""
        return {}

    def batched_loss(self, params: Tensor, optimizees: Optimizees, step: int) -> Tensor:
        """Losses ``[B]`` of every optimizee at ``params`` [B, n] on its minibatch for ``step``."""
        batch = self.batch(optimizees, step)
        return torch.func.vmap(self.loss)(params, optimizees.data, batch)

    def episode_family(self, episode: int) -> TaskFamily:
        """The family an estimator trains on in ``episode``: always this one (a ``TaskMixture`` draws one)."""
        return self

    def spec(self) -> dict:
        """A JSON description of this family."""
        return {"name": self.name, "num_params": self.num_params}


def hash_uniform_indices(seeds: Tensor, step: int, count: int, high: int) -> Tensor:
    """Indices ``[B, count]`` in ``[0, high)``, a pure function of (seed, step, position).

    A counter-based hash (lowbias32), so each optimizee's minibatch stream is independent of how
    many optimizees share the batch, with no per-optimizee Python loop or generator.
    """
    mask = 0xFFFFFFFF
    position = torch.arange(count, device=seeds.device, dtype=torch.int64)
    x = (seeds[:, None] * 0x9E3779B1 + step * 0x85EBCA77 + position[None, :] * 0xC2B2AE3D) & mask
    for shift, multiplier in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        x = ((x ^ (x >> shift)) * multiplier) & mask
    x = x ^ (x >> 16)
    return x % high
