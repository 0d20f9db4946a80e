"""Truncated unrolls of a learned optimizer training a batch of optimizees (no Ray, no MLflow)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from metaopt.optimizers import MetaParams, Optimizer, OptState
from metaopt.tasks import Optimizees, TaskFamily

UpdateFn = Callable[[MetaParams, Tensor, OptState, int], tuple[Tensor, OptState]]


@dataclass
class UnrollState:
    """Where a batch of optimizees stands inside its episode."""

    optimizees: Optimizees
    params: Tensor  # [B, n]
    opt_state: OptState
    step: int  # optimizee steps taken in this episode

    def detached(self) -> UnrollState:
        """The same state cut from the autograd graph (carried on between truncations)."""
        return UnrollState(
            self.optimizees,
            self.params.detach(),
            {k: v.detach() for k, v in self.opt_state.items()},
            self.step,
        )


def start_episode(optimizees: Optimizees, optimizer: Optimizer) -> UnrollState:
    """``optimizees`` at step 0 with a fresh optimizer state."""
    return UnrollState(optimizees, optimizees.params, optimizer.init_state(optimizees.params), 0)


def unroll(
    family: TaskFamily,
    update: UpdateFn,
    meta_params: MetaParams,
    state: UnrollState,
    length: int,
    second_order: bool = False,
) -> tuple[Tensor, UnrollState]:
    """Take ``length`` optimizer steps; return the losses ``[length, B]`` after each step.

    The losses stay differentiable w.r.t. ``meta_params`` when those require grad. First-order
    (the default, as in L2L and OPT-ML) feeds the optimizer detached gradients; ``second_order``
    keeps the gradients' own dependence on the meta-parameters.
    """
    params, opt_state = state.params, state.opt_state
    track = any(p.requires_grad for p in meta_params.values())
    losses = []
    with torch.enable_grad():
        if not params.requires_grad:
            params = params.detach().requires_grad_(True)
        loss = family.batched_loss(params, state.optimizees, state.step)
        for i in range(length):
            (grads,) = torch.autograd.grad(
                loss.sum(), params, create_graph=second_order and track, retain_graph=track
            )
            if not (second_order and track):
                grads = grads.detach()
            updates, opt_state = update(meta_params, grads, opt_state, state.step + i)
            params = params + updates
            if not track:
                params = params.detach().requires_grad_(True)
                opt_state = {k: v.detach() for k, v in opt_state.items()}
            loss = family.batched_loss(params, state.optimizees, state.step + i + 1)
            losses.append(loss if track else loss.detach())
    return torch.stack(losses), UnrollState(state.optimizees, params, opt_state, state.step + length)
