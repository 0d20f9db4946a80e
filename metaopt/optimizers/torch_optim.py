"""A metaopt optimizer (learned or hand-designed) as a drop-in ``torch.optim.Optimizer``."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor

from metaopt.optimizers.base import MetaParams, Optimizer

STEP = "step"


class LearnedOptimizer(torch.optim.Optimizer):
    """Steps a model's parameters with a functional metaopt ``optimizer`` and its ``meta_params``.

    Every parameter coordinate is one row of the coordinatewise optimizer, so all parameters of a
    group (per device and dtype) go through it as one batched call. ``lr`` multiplies the updates
    (1.0 is the optimizer as meta-trained), so learning-rate schedulers and per-group rates work.
    Per-parameter state lives in ``self.state[p]`` like any torch optimizer's, so ``state_dict``
    / ``load_state_dict`` resume a user's training exactly.
    """

    def __init__(self, params: Iterable, optimizer: Optimizer, meta_params: MetaParams, lr: float = 1.0):
        if lr <= 0:
            raise ValueError(f"lr must be > 0 (a multiplier on the learned updates, 1.0 as trained); got {lr}")
        super().__init__(params, {"lr": lr})
        self.optimizer = optimizer
        self.meta_params = {k: v.detach() for k, v in meta_params.items()}
        self._on_device: dict[tuple[torch.device, torch.dtype], MetaParams] = {}

    def _meta_params(self, device: torch.device, dtype: torch.dtype) -> MetaParams:
        key = (device, dtype)
        if key not in self._on_device:
            self._on_device[key] = {k: v.to(device=device, dtype=dtype) for k, v in self.meta_params.items()}
        return self._on_device[key]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_device: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
            for param in group["params"]:
                if param.grad is not None:
                    if param.grad.is_sparse:
                        raise RuntimeError("LearnedOptimizer does not support sparse gradients")
                    by_device.setdefault((param.device, param.dtype), []).append(param)
            for (device, dtype), params in by_device.items():
                self._step_params(params, group["lr"], self._meta_params(device, dtype))
        return loss

    def _step_params(self, params: list[Tensor], lr: float, meta_params: MetaParams) -> None:
        """One batched update of ``params`` (same device and dtype), state kept per parameter."""
        for param in params:
            if not self.state[param]:
                self.state[param].update(self.optimizer.init_state(param.new_zeros(param.numel())))
                self.state[param][STEP] = torch.zeros((), dtype=torch.int64)
        step = int(self.state[params[0]][STEP])
        sizes = [p.numel() for p in params]
        grads = torch.cat([p.grad.reshape(-1) for p in params])
        state_keys = [k for k in self.state[params[0]] if k != STEP]
        state = {k: torch.cat([self.state[p][k] for p in params]) for k in state_keys}
        updates, new_state = self.optimizer.update(meta_params, grads, state, step)
        if lr != 1.0:
            updates = updates * lr
        torch._foreach_add_(params, [u.view_as(p) for u, p in zip(updates.split(sizes), params)])
        for key, value in new_state.items():
            for param, chunk in zip(params, value.split(sizes)):
                self.state[param][key] = chunk
        for param in params:
            self.state[param][STEP] += 1
