"""Per-coordinate input features shared by learned optimizers."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def log_sign_preprocess(grads: Tensor, p: float = 10.0) -> Tensor:
    """Andrychowicz et al. 2016 preprocessing: ``grads`` [...] -> [..., 2].

    (log|g| / p, sign g) where |g| >= e^-p, else (-1, e^p · g). Differentiable w.r.t. ``grads``
    (nothing is detached), so every network reading it gets a meta-gradient when grads carry one.
    """
    threshold = math.exp(-p)
    large = grads.abs() >= threshold
    magnitude = torch.where(large, grads.abs().clamp_min(threshold).log() / p, torch.full_like(grads, -1.0))
    direction = torch.where(large, torch.sign(grads), grads * math.exp(p))
    return torch.stack([magnitude, direction], dim=-1)


def log_sign_constants(p: float = 10.0) -> dict[str, float]:
    """``log_sign_preprocess``'s constants as the fused kernels take them: e^-p, p and e^p, by name."""
    return {"threshold": math.exp(-p), "log_divisor": p, "small_scale": math.exp(p)}
