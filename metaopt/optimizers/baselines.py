"""Hand-designed optimizers in the functional interface; each matches its ``torch.optim`` twin."""

from __future__ import annotations

import torch
from torch import Tensor

from metaopt.optimizers.base import MetaParams, Optimizer, OptState


class SGD(Optimizer):
    """Plain gradient descent: ``-lr * g``."""

    kind = "sgd"

    def __init__(self, lr: float = 0.01):
        self.lr = lr

    def init_state(self, params: Tensor) -> OptState:
        return {}

    def update(self, meta_params: MetaParams, grads: Tensor, state: OptState, step: int):
        return -self.lr * grads, state


class Momentum(Optimizer):
    """Heavy-ball momentum, as ``torch.optim.SGD(momentum=...)``: ``b = mu*b + g``, ``-lr * b``."""

    kind = "momentum"
    nesterov = False

    def __init__(self, lr: float = 0.01, momentum: float = 0.9):
        self.lr = lr
        self.momentum = momentum

    def init_state(self, params: Tensor) -> OptState:
        return {"momentum": torch.zeros_like(params)}

    def update(self, meta_params: MetaParams, grads: Tensor, state: OptState, step: int):
        buf = self.momentum * state["momentum"] + grads
        direction = grads + self.momentum * buf if self.nesterov else buf
        return -self.lr * direction, {"momentum": buf}


class Nesterov(Momentum):
    """Nesterov momentum, as ``torch.optim.SGD(momentum=..., nesterov=True)``."""

    kind = "nesterov"
    nesterov = True


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015) with bias correction, as ``torch.optim.Adam``."""

    kind = "adam"

    def __init__(self, lr: float = 0.001, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
        self.lr = lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.eps = eps

    def init_state(self, params: Tensor) -> OptState:
        return {"exp_avg": torch.zeros_like(params), "exp_avg_sq": torch.zeros_like(params)}

    def update(self, meta_params: MetaParams, grads: Tensor, state: OptState, step: int):
        exp_avg = self.beta1 * state["exp_avg"] + (1 - self.beta1) * grads
        exp_avg_sq = self.beta2 * state["exp_avg_sq"] + (1 - self.beta2) * grads * grads
        t = step + 1
        bias_correction1 = 1 - self.beta1**t
        bias_correction2_sqrt = (1 - self.beta2**t) ** 0.5
        denom = exp_avg_sq.sqrt() / bias_correction2_sqrt + self.eps
        updates = -(self.lr / bias_correction1) * exp_avg / denom
        return updates, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


class RMSprop(Optimizer):
    """RMSprop (Tieleman & Hinton 2012), as ``torch.optim.RMSprop``: ``-lr * g / (sqrt(v) + eps)``."""

    kind = "rmsprop"

    def __init__(self, lr: float = 0.01, alpha: float = 0.99, eps: float = 1e-8):
        self.lr = lr
        self.alpha = alpha
        self.eps = eps

    def init_state(self, params: Tensor) -> OptState:
        return {"square_avg": torch.zeros_like(params)}

    def update(self, meta_params: MetaParams, grads: Tensor, state: OptState, step: int):
        square_avg = self.alpha * state["square_avg"] + (1 - self.alpha) * grads * grads
        updates = -self.lr * grads / (square_avg.sqrt() + self.eps)
        return updates, {"square_avg": square_avg}


BASELINES: dict[str, type[Optimizer]] = {cls.kind: cls for cls in (SGD, Momentum, Nesterov, Adam, RMSprop)}
