"""Optimizers, hand-designed and learned, behind one functional interface."""

from __future__ import annotations

import inspect
from typing import Any

from metaopt.optimizers.base import MetaParams, Optimizer, OptState
from metaopt.optimizers.baselines import BASELINES
from metaopt.optimizers.hnn_seed import HNNSeed
from metaopt.optimizers.lstm import CoordinatewiseLSTM
from metaopt.optimizers.mlp import MLPOptimizer
from metaopt.optimizers.phnn import PHNN

LEARNED: dict[str, type[Optimizer]] = {cls.kind: cls for cls in (PHNN, HNNSeed, CoordinatewiseLSTM, MLPOptimizer)}
OPTIMIZERS: dict[str, type[Optimizer]] = {**BASELINES, **LEARNED}


def optimizer_options(kind: str) -> dict[str, Any]:
    """The constructor options of optimizer ``kind`` and their defaults."""
    cls = OPTIMIZERS[kind]
    params = inspect.signature(cls.__init__).parameters
    return {name: p.default for name, p in params.items() if name != "self"}


def make_optimizer(kind: str, **options: Any) -> Optimizer:
    """Build optimizer ``kind`` with ``options``; unknown kinds or options raise ``ValueError``."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer kind {kind!r}; choose one of: {', '.join(sorted(OPTIMIZERS))}")
    allowed = optimizer_options(kind)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for optimizer {kind!r}; allowed: {', '.join(allowed)}"
        )
    return OPTIMIZERS[kind](**options)


__all__ = ["LEARNED", "OPTIMIZERS", "MetaParams", "OptState", "Optimizer", "make_optimizer", "optimizer_options"]
