"""metaopt's public API for users of trained optimizers."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from metaopt.meta.checkpoint import load_checkpoint
from metaopt.optimizers.torch_optim import LearnedOptimizer
from metaopt.tracking.registry import resolve_checkpoint


def load_optimizer(source: str | Path, params: Iterable, tracking_uri: str | None = None, **options: Any):
    """A ``torch.optim.Optimizer`` that steps ``params`` with the trained optimizer at ``source``.

    ``source``: ``pretrained:general`` (shipped in the package, no network), ``models:/NAME@ALIAS``,
    ``models:/NAME/VERSION``, ``runs:/RUN_ID/optimizer`` or a local checkpoint folder (remote ones cached,
    and weights checked, by ``resolve_checkpoint``). ``options``
    go to ``LearnedOptimizer`` (e.g. ``lr``, a multiplier on the learned updates, 1.0 as trained;
    ``horizon``, the steps of the run for a learned step schedule).
    """
    optimizer, meta_params, _ = load_checkpoint(resolve_checkpoint(source, tracking_uri))
    return LearnedOptimizer(params, optimizer, meta_params, **options)
