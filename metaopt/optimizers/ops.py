"""The fused learned-optimizer steps as ``torch.library`` ops in the ``metaopt`` namespace.

They are defined on a ``torch.library.Library`` and called as ``torch.ops.metaopt.*`` overloads, not
through ``torch.library.custom_op``, whose Python wrapper costs about 10 µs more a call (5% of a
10⁴-parameter phnn step).

Each native kernel ``K`` (``csrc/K.c``) is three ops, whose schemas name the kernel's settings (its
``Options`` struct, field by field) as keyword arguments:

- ``metaopt::K(grad, state, weights, scalars, *, settings) -> (update, next_state)``: one step into new
  tensors. Its autograd (first order: the gradient is a constant, and only the first state carries a
  gradient) is the hand-written backward kernel, ``metaopt::K_backward``, so meta-gradients reach the
  packed ``weights`` and ``scalars`` and, through torch's own autograd, the meta-parameters they were
  packed from.
- ``metaopt::K_(params, grads, state, weights, scalars, *, settings)``: ``params[i] += update`` and the
  state overwritten in place, over a list of parameters: the step ``torch.optim`` users run.
- ``metaopt::K_backward``.

On CUDA tensors, kernels with a Triton implementation (phnn: ``triton_phnn.py``) run all three ops, so
first-order meta-training runs through them on a GPU too.

``scalars`` holds the settings that are tensors: those with a meta-gradient (phnn's h and A₀) and those
that change with the step (phnn's bias correction and scheduled rate). Every op has a fake (meta)
implementation, so ``torch.compile`` and ``torch.export`` trace through them.
"""

from __future__ import annotations

import ctypes
import importlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metaopt.optimizers.native import run_fused, run_fused_backward

_SCHEMA_TYPES = {ctypes.c_int: "int", ctypes.c_float: "float"}
LIBRARY = torch.library.Library("metaopt", "DEF")


@dataclass
class KernelOps:
    """The ops of one kernel and how its ``Options`` split into settings and ``scalars``."""

    kernel: str
    options: type[ctypes.Structure]
    scalars: tuple[str, ...]  # Options fields passed in the ``scalars`` tensor, in its order
    differentiable: tuple[str, ...]  # the scalars whose gradients the backward kernel sums after the weights'
    step: torch._ops.OpOverload  # metaopt::K
    step_: torch._ops.OpOverload  # metaopt::K_
    backward: torch._ops.OpOverload  # metaopt::K_backward
    cuda: str | None  # the module of the ops' CUDA (Triton) implementations, if there is one

    def struct(self, settings: dict[str, Any], scalars: Tensor) -> ctypes.Structure:
        """The kernel's ``Options`` from the ops' settings and scalars."""
        return self.options(**settings, **dict(zip(self.scalars, scalars.tolist())))


def define_kernel_ops(
    kernel: str,
    options: type[ctypes.Structure],
    scalars: tuple[str, ...] = (),
    differentiable: tuple[str, ...] = (),
    cuda: str | None = None,
) -> KernelOps:
    """Register ``metaopt::{kernel}``, ``metaopt::{kernel}_`` and ``metaopt::{kernel}_backward``; ``cuda``
    names the module whose functions of the ops' names are their CUDA implementations (Triton)."""
    settings = ", ".join(f"{_SCHEMA_TYPES[kind]} {name}" for name, kind in options._fields_ if name not in scalars)
    common = f"Tensor weights, Tensor scalars, *, {settings}"
    extra = len(differentiable)

    def step(grad: Tensor, state: list[Tensor], weights: Tensor, scalars: Tensor, **kwargs):
        grad = grad.contiguous()
        updates, new_state = torch.zeros_like(grad), [s.contiguous().clone() for s in state]
        run_fused(kernel, [updates], [grad], new_state, weights.contiguous(), ops.struct(kwargs, scalars))
        return updates, new_state

    def step_(
        params: list[Tensor], grads: list[Tensor], state: list[Tensor], weights: Tensor, scalars: Tensor, **kwargs
    ):
        run_fused(kernel, params, grads, state, weights, ops.struct(kwargs, scalars))
        torch.autograd.graph.increment_version([*params, *state])

    def backward(grad, state, weights, scalars, grad_update, grad_p, **kwargs):
        inputs = [state[0], grad_update, grad_p, *(state[1:] or state[:1])]
        return run_fused_backward(
            kernel,
            grad.contiguous(),
            [t.contiguous() for t in inputs],
            weights.contiguous(),
            ops.struct(kwargs, scalars),
            extra,
        )

    names = {"step": kernel, "step_": kernel + "_", "backward": kernel + "_backward"}
    LIBRARY.define(f"{names['step']}(Tensor grad, Tensor[] state, {common}) -> (Tensor, Tensor[])")
    LIBRARY.define(f"{names['step_']}(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state, {common}) -> ()")
    backward_common = common.replace("*,", "Tensor grad_update, Tensor grad_p, *,")
    LIBRARY.define(f"{names['backward']}(Tensor grad, Tensor[] state, {backward_common}) -> (Tensor, Tensor)")
    qualified = {key: f"metaopt::{name}" for key, name in names.items()}
    for key, implementation in (("step", step), ("step_", step_), ("backward", backward)):
        torch.library.register_kernel(qualified[key], "cpu", implementation, lib=LIBRARY)

    @torch.library.register_fake(qualified["step"], lib=LIBRARY)
    def _(grad, state, weights, scalars, **kwargs):
        return torch.empty_like(grad), [torch.empty_like(s) for s in state]

    @torch.library.register_fake(qualified["step_"], lib=LIBRARY)
    def _(params, grads, state, weights, scalars, **kwargs):
        return None

    @torch.library.register_fake(qualified["backward"], lib=LIBRARY)
    def _(grad, state, weights, scalars, grad_update, grad_p, **kwargs):
        return torch.empty_like(state[0]), weights.new_empty(weights.numel() + extra, dtype=torch.float64)

    def setup_context(ctx, inputs, keyword_only_inputs, output):
        grad, state, weights, scalars = inputs
        ctx.save_for_backward(grad, weights, scalars, *state)
        ctx.settings = keyword_only_inputs

    def step_backward(ctx, grad_update, grad_state):
        grad, weights, scalars, *state = ctx.saved_tensors
        grad_p = grad_state[0] if grad_state[0] is not None else torch.zeros_like(state[0])
        grad_update = grad_update if grad_update is not None else torch.zeros_like(grad)
        grad_first, sums = ops.backward(grad, state, weights, scalars, grad_update, grad_p, **ctx.settings)
        grad_scalars = torch.zeros_like(scalars)
        for offset, name in enumerate(differentiable):
            grad_scalars[ops.scalars.index(name)] = sums[weights.numel() + offset]
        grad_states = [grad_first, *[None] * (len(state) - 1)]
        return None, grad_states, sums[: weights.numel()].to(weights.dtype), grad_scalars

    torch.library.register_autograd(qualified["step"], step_backward, setup_context=setup_context, lib=LIBRARY)

    def second_order(ctx, *grads):
        raise RuntimeError(
            f"metaopt::{kernel} is first order: its backward has no gradient of its own, so gradients of "
            "meta-gradients (create_graph=True through the fused step) are not available; "
            "meta-train second order (train.estimator.second_order: true) to run the batched update"
        )

    torch.library.register_autograd(qualified["backward"], second_order, lib=LIBRARY)
    if cuda is not None:
        for key, name in names.items():
            torch.library.register_kernel(qualified[key], "cuda", _imported(cuda, name), lib=LIBRARY)
    overloads = [getattr(torch.ops.metaopt, name).default for name in names.values()]
    ops = KernelOps(kernel, options, scalars, differentiable, *overloads, cuda)
    return ops


def _imported(module: str, name: str):
    """``module.name``, imported at its first call (the Triton module at the first CUDA call, not with metaopt)."""

    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    return call
