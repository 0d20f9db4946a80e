"""Unrolls, meta-gradient estimators, checkpoints and the single-process meta-trainer (no Ray, no MLflow)."""

from metaopt.meta.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from metaopt.meta.estimators import AntitheticES, Estimate, Estimator, TruncatedBackprop, make_estimator
from metaopt.meta.trainer import MetaTrainer
from metaopt.meta.unroll import UnrollState, start_episode, unroll

__all__ = [
    "AntitheticES",
    "CheckpointError",
    "Estimate",
    "Estimator",
    "MetaTrainer",
    "TruncatedBackprop",
    "UnrollState",
    "load_checkpoint",
    "make_estimator",
    "save_checkpoint",
    "start_episode",
    "unroll",
]
