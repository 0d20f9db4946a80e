"""A metaopt optimizer (learned or hand-designed) as a drop-in ``torch.optim.Optimizer``."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from metaopt.optimizers.base import MetaParams, Optimizer, OptState, fused_refusal

STEP = "step"


@dataclass
class _FlatGroup:
    """Parameters of one group, device and dtype, with their optimizer state in flat buffers.

    ``self.state[p][key]`` of every parameter is a view into ``state[key]`` (and its step counter a
    view into ``steps``), so one batched update writes all parameters' state at once.
    """

    param_ids: tuple[int, ...]
    sizes: list[int]
    state: OptState  # key -> [total, ...]
    steps: Tensor  # [len(params)] int64
    runs: list[tuple[int, int, int, int]]  # (first, end) parameters with equal step counts, (first, end) coordinates
    fused_weights: Tensor | None  # the fused step's packed meta-parameters where it runs (decided once per group)


def _equal_step_runs(steps: list[int], sizes: list[int]) -> list[tuple[int, int, int, int]]:
    """The ranges of consecutive parameters with equal ``steps``: one when all agree (the usual case)."""
    starts = [i for i in range(len(steps)) if i == 0 or steps[i] != steps[i - 1]]
    offsets = [0, *itertools.accumulate(sizes)]
    return [(start, end, offsets[start], offsets[end]) for start, end in zip(starts, starts[1:] + [len(steps)])]


class LearnedOptimizer(torch.optim.Optimizer):
    """Steps a model's parameters with a functional metaopt ``optimizer`` and its ``meta_params``.

    Every parameter coordinate is one row of the coordinatewise optimizer, so all parameters of a
    group (per device and dtype) go through it as one batched call: one concatenation of the
    gradients, one network call, one foreach add, one copy into the flat state; no per-parameter
    work. ``lr`` multiplies the updates (1.0 is the optimizer as meta-trained), so learning-rate
    schedulers and per-group rates work. Per-parameter state lives in ``self.state[p]`` (as views
    into a flat buffer) like any torch optimizer's, so ``state_dict`` / ``load_state_dict``
    resume a user's training exactly.

    ``fused``, as in ``torch.optim.Adam``: the optimizer's one-pass step (``fused_step``: the native C
    step of hnn_seed, lstm and phnn in its usual shapes on contiguous float32 CPU tensors, built on first
    use with the system C compiler; phnn's Triton step on CUDA) in place of the batched update. ``None``
    (default) uses it where it takes the tensors and the batched update elsewhere (float64, CUDA without
    a Triton step, and everywhere, after one warning, if it cannot be built); ``True`` requires it;
    ``False`` never uses it. The choice is made once per group of parameters. ``compile=True`` runs the
    batched update through ``torch.compile`` and falls back to eager, with a warning, where compilation
    fails. Step counts stay tensors, so ``torch.compile(optimizer.step, fullgraph=True)`` traces the
    whole step, fused or batched, and does not recompile as the count grows.

    ``meta_params`` are copied: later changes to the caller's tensors do not reach the optimizer.

    ``horizon``, for an optimizer with a learned step schedule (phnn with ``horizon``): the number of
    steps the user's run takes, over which the schedule is stretched (default: the horizon it was
    meta-trained on). Stepping past the horizon warns once; the schedule then holds its last level.
    """

    def __init__(
        self,
        params: Iterable,
        optimizer: Optimizer,
        meta_params: MetaParams,
        lr: float = 1.0,
        compile: bool = False,
        fused: bool | None = None,
        horizon: int | None = None,
    ):
        if horizon is not None:
            optimizer = optimizer.with_horizon(horizon)
        if lr <= 0:
            raise ValueError(f"lr must be > 0 (a multiplier on the learned updates, 1.0 as trained); got {lr}")
        if fused and optimizer.fused_kernel is None:
            raise ValueError(f"fused=True: optimizer {optimizer.kind!r} has no fused step; leave fused unset")
        if fused and compile:
            raise ValueError("fused=True and compile=True exclude each other: the fused step is not compiled")
        super().__init__(params, {"lr": lr})
        self.optimizer = optimizer
        self.meta_params = {k: v.detach().clone() for k, v in meta_params.items()}  # fixed from here on
        self._on_device: dict[tuple[torch.device, torch.dtype], MetaParams] = {}
        self._flat: dict[tuple[int, torch.device, torch.dtype], _FlatGroup] = {}
        self._update = torch.compile(optimizer.update) if compile else None
        self.fused = False if compile else fused  # the compiled update is never fused

    def load_state_dict(self, state_dict: dict) -> None:
        expected = sorted(self.optimizer.init_state(torch.zeros(1)))
        for index, param_state in state_dict.get("state", {}).items():
            found = sorted(set(param_state) - {STEP})
            if found != expected:
                raise ValueError(
                    f"state_dict holds state {found} for parameter {index}, but a {self.optimizer.kind!r} "
                    f"LearnedOptimizer keeps {expected}: it was saved by another optimizer or an older metaopt "
                    "(lstm kept 'h' and 'c' before they became one 'hc')"
                )
        super().load_state_dict(state_dict)
        self._flat.clear()  # the loaded state replaced the views into the flat buffers

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
        for index, group in enumerate(self.param_groups):
            by_device: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
            for param in group["params"]:
                if param.grad is not None:
                    if param.grad.is_sparse:
                        raise RuntimeError("LearnedOptimizer does not support sparse gradients")
                    by_device.setdefault((param.device, param.dtype), []).append(param)
            for (device, dtype), params in by_device.items():
                flat = self._flat_group((index, device, dtype), params)
                self._step_flat(flat, params, group["lr"], self._meta_params(device, dtype))
        return loss

    def _flat_group(self, key: tuple[int, torch.device, torch.dtype], params: list[Tensor]) -> _FlatGroup:
        """The cached flat state of ``params``, rebuilt when the set of parameters changed or a
        state dict was loaded."""
        param_ids = tuple(map(id, params))
        flat = self._flat.get(key)
        if flat is not None and flat.param_ids == param_ids:
            return flat
        sizes = [p.numel() for p in params]
        for param in params:  # only when (re)building: fresh parameters get a fresh state
            if not self.state[param]:
                self.state[param].update(self.optimizer.init_state(param.new_zeros(param.numel())))
                self.state[param][STEP] = torch.zeros((), dtype=torch.int64)
        keys = [k for k in self.state[params[0]] if k != STEP]
        state = {k: torch.cat([self.state[p][k] for p in params]) for k in keys}
        steps = torch.stack([self.state[p][STEP].reshape(()) for p in params])
        for param, step_view, *chunks in zip(params, steps.unbind(), *(state[k].split(sizes) for k in keys)):
            self.state[param].update(zip(keys, chunks))
            self.state[param][STEP] = step_view
        # Parameters of a group step together, so the runs hold until the group is rebuilt.
        fused = False
        if self.fused is not False:
            refusal = fused_refusal(self.optimizer, [*params, *(p.grad for p in params), *state.values()])
            if refusal is not None and self.fused:
                raise RuntimeError(f"fused=True, but the fused {self.optimizer.kind} step cannot run: {refusal}")
            fused = refusal is None
        weights = self.optimizer.fused_weights(self._meta_params(*key[1:])) if fused else None
        flat = _FlatGroup(param_ids, sizes, state, steps, _equal_step_runs(steps.tolist(), sizes), weights)
        self._flat[key] = flat
        return flat

    def _step_flat(self, flat: _FlatGroup, params: list[Tensor], lr: float, meta_params: MetaParams) -> None:
        """One update of a flat group, its state buffers overwritten in place. Each parameter follows its own
        step count: parameters that skipped steps (no ``.grad``) are updated apart from the others."""
        flat_params, grads = [p.view(-1) for p in params], [p.grad for p in params]
        for start, end, first, last in flat.runs:
            state = {key: value[first:last] for key, value in flat.state.items()}
            self._step_run(
                flat_params[start:end],
                grads[start:end],
                flat.sizes[start:end],
                state,
                flat.steps[start],
                lr,
                meta_params,
                flat.fused_weights,
            )
        flat.steps.add_(1)

    def _step_run(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        sizes: list[int],
        state: OptState,
        step: Tensor,
        lr: float,
        meta_params: MetaParams,
        fused_weights: Tensor | None,
    ) -> None:
        """One update, fused (with ``fused_weights``) or batched, of flat parameters that share their 0-based
        ``step`` (a tensor, so that a compiled step does not depend on its value) and whose state is
        ``state`` (views, overwritten in place)."""
        horizon = self.optimizer.horizon
        if horizon is not None and not torch.compiler.is_compiling() and int(step) == horizon:
            warnings.warn(
                f"step {horizon + 1} passes the {self.optimizer.kind} optimizer's horizon of {horizon} steps: "
                "its learned schedule holds its last level from here on; to stretch the schedule over a "
                "longer run, pass horizon=<the run's steps> to load_optimizer"
            )
        grads = [g.reshape(-1) for g in grads]
        if fused_weights is not None:
            self.optimizer.fused_step(meta_params, params, grads, state, step, lr, fused_weights)
            return
        grad = torch.cat(grads)
        updates, new_state = self._call_update(meta_params, grad, state, step)
        torch._foreach_add_(params, updates.split(sizes), alpha=lr)
        for key, value in new_state.items():
            state[key].copy_(value)

    def _call_update(self, meta_params: MetaParams, grad: Tensor, state: OptState, step: int):
        if self._update is not None:
            try:
                return self._update(meta_params, grad, state, step)
            except Exception as error:  # no C++ compiler, unsupported op, ...: eager from now on
                warnings.warn(f"torch.compile of the {self.optimizer.kind} update failed, running eager: {error}")
                self._update = None
        return self.optimizer.update(meta_params, grad, state, step)
