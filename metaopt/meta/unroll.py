"""Truncated unrolls of a learned optimizer training a batch of optimizees (no Ray, no MLflow)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

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
    checkpoint_steps: int = 0,
) -> tuple[Tensor, UnrollState]:
    """Take ``length`` optimizer steps; return the losses ``[length, B]`` after each step.

    The losses stay differentiable w.r.t. ``meta_params`` when those require grad. First-order
    (the default, as in L2L and OPT-ML) feeds the optimizer detached gradients; ``second_order``
    keeps the gradients' own dependence on the meta-parameters.

    ``checkpoint_steps > 0`` (activation checkpointing) keeps only the optimizee state at the start
    of every chunk of that many steps and recomputes each chunk's activations during the
    meta-backward: the same meta-gradient with about ``length / checkpoint_steps`` optimizee states
    plus one chunk of activations in memory, for one extra forward pass. The returned state is
    then detached (what truncated backprop carries on anyway).
    """
    track = any(p.requires_grad for p in meta_params.values())
    if track and 0 < checkpoint_steps < length:
        names = list(meta_params)

        def run(values, params, opt_state, start, count, track_chunk):
            return _steps(
                family,
                update,
                dict(zip(names, values)),
                state.optimizees,
                params,
                opt_state,
                state.step + start,
                count,
                second_order and track_chunk,
                track_chunk,
            )

        final: dict = {}
        losses = _CheckpointedUnroll.apply(run, state, length, checkpoint_steps, final, *meta_params.values())
        return losses, UnrollState(state.optimizees, final["params"], final["opt_state"], state.step + length)
    with torch.enable_grad():
        losses, params, opt_state = _steps(
            family,
            update,
            meta_params,
            state.optimizees,
            state.params,
            state.opt_state,
            state.step,
            length,
            second_order and track,
            track,
        )
    return losses, UnrollState(state.optimizees, params, opt_state, state.step + length)


def _steps(
    family: TaskFamily,
    update: UpdateFn,
    meta_params: MetaParams,
    optimizees: Optimizees,
    params: Tensor,
    opt_state: OptState,
    start: int,
    count: int,
    second_order: bool,
    track: bool,
) -> tuple[Tensor, Tensor, OptState]:
    """``count`` optimizer steps from episode step ``start``: (losses ``[count, B]``, params, state)."""
    if not params.requires_grad:
        params = params.detach().requires_grad_(True)
    loss = family.batched_loss(params, optimizees, start)
    losses = []
    for i in range(count):
        (grads,) = torch.autograd.grad(loss.sum(), params, create_graph=second_order, retain_graph=track)
        if not second_order:
            grads = grads.detach()
        updates, opt_state = update(meta_params, grads, opt_state, start + i)
        params = params + updates
        if not track:
            params = params.detach().requires_grad_(True)
            opt_state = {k: v.detach() for k, v in opt_state.items()}
        loss = family.batched_loss(params, optimizees, start + i + 1)
        losses.append(loss if track else loss.detach())
    return torch.stack(losses), params, opt_state


class _CheckpointedUnroll(torch.autograd.Function):
    """The unroll as one autograd node: the forward keeps each chunk's starting state and no graph;
    the backward recomputes the chunks last to first, each with its graph, and chains the
    gradients w.r.t. the chunk's starting state into the chunk before. (Written by hand rather than
    with ``torch.utils.checkpoint``: its saved-tensor hooks are refused inside ``torch.func.grad``,
    which optimizers such as phnn use.)"""

    @staticmethod
    def forward(ctx, run, state: UnrollState, length: int, chunk: int, final: dict, *meta_values: Tensor):
        values = [v.detach() for v in meta_values]
        params, opt_state = state.params.detach(), {k: v.detach() for k, v in state.opt_state.items()}
        starts, losses = [], []
        with torch.enable_grad():
            for start in range(0, length, chunk):
                starts.append((start, min(chunk, length - start), params, opt_state))
                chunk_losses, params, opt_state = run(values, params, opt_state, start, starts[-1][1], False)
                losses.append(chunk_losses)
        final["params"], final["opt_state"] = params.detach(), opt_state
        ctx.run, ctx.starts = run, starts
        ctx.save_for_backward(*meta_values)
        return torch.cat(losses)

    @staticmethod
    def backward(ctx, grad_losses: Tensor):
        values = [v.detach().requires_grad_(True) for v in ctx.saved_tensors]
        meta_grads = [torch.zeros_like(v) for v in values]
        carried: list[Tensor] = []  # gradient w.r.t. the end state of the chunk being recomputed
        for start, count, params, opt_state in reversed(ctx.starts):
            with torch.enable_grad():
                params = params.detach().requires_grad_(True)
                opt_state = {k: v.detach().requires_grad_(True) for k, v in opt_state.items()}
                losses, end_params, end_state = ctx.run(values, params, opt_state, start, count, True)
                outputs = [losses] + ([end_params, *end_state.values()] if carried else [])
                inputs = values + [params, *opt_state.values()]
                grads = torch.autograd.grad(
                    outputs, inputs, [grad_losses[start : start + count], *carried], allow_unused=True
                )
            grads = [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]
            meta_grads = [total + g for total, g in zip(meta_grads, grads[: len(values)])]
            carried = grads[len(values) :]
        return (None, None, None, None, None, *meta_grads)


def rollout_losses(
    family: TaskFamily,
    optimizer: Optimizer,
    meta_params: MetaParams,
    optimizees: Optimizees,
    steps: int,
    progress: tqdm | None = None,
) -> Tensor:
    """Optimize every optimizee for ``steps`` steps as one batch; losses ``[B, steps + 1]``."""
    params = optimizees.params.detach().clone()
    state = optimizer.init_state(params)
    losses = []
    for step in range(steps + 1):
        params.requires_grad_(True)
        loss = family.batched_loss(params, optimizees, step)
        losses.append(loss.detach())
        if step == steps:
            break
        (grads,) = torch.autograd.grad(loss.sum(), params)
        with torch.no_grad():
            updates, state = optimizer.update_no_grad(meta_params, grads, state, step)
            params = params.detach() + updates
        if progress is not None:
            progress.update(1)
    return torch.stack(losses, dim=1).cpu()


def mean_final_loss(losses: Tensor) -> float:
    """Mean loss at the last step; a run that diverged (non-finite) makes it infinite."""
    return mean_loss(losses[:, -1])


def mean_loss(losses: Tensor) -> float:
    """Mean of ``losses``; infinite where any is not finite (a run that diverged)."""
    return float(losses.mean()) if torch.isfinite(losses).all() else math.inf
