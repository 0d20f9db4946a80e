"""A metaopt optimizer (learned or hand-designed) as a drop-in ``torch.optim.Optimizer``."""

from __future__ import annotations

import itertools
import math
import numbers
import warnings
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from metaopt.optimizers.base import MetaParams, Optimizer, OptState, fused_refusal

STEP = "step"


@dataclass
class _FlatGroup:
    """Parameters of one group, device and dtype, with their optimizer state in flat buffers.

    ``self.state[p][key]`` of every parameter is a view, shaped ``[*p.shape, ...]``, into ``state[key]``
    (and its step counter a view into ``steps``), so one batched update writes all parameters' state at once.
    """

    param_ids: tuple[int, ...]
    sizes: list[int]
    state: OptState  # key -> [total, ...]: each parameter's coordinates in its row-major order
    steps: Tensor  # [len(params)] int64
    runs: list[tuple[int, int, int, int]]  # (first, end) parameters with equal step counts, (first, end) coordinates
    fused_weights: Tensor | None  # the fused step's packed meta-parameters where it runs (decided once per group)


def _equal_step_runs(cohorts: list[Hashable], sizes: list[int]) -> list[tuple[int, int, int, int]]:
    """The ranges of consecutive parameters of one step cohort: one when all agree (the usual case)."""
    starts = [i for i in range(len(cohorts)) if i == 0 or cohorts[i] != cohorts[i - 1]]
    offsets = [0, *itertools.accumulate(sizes)]
    return [(start, end, offsets[start], offsets[end]) for start, end in zip(starts, starts[1:] + [len(cohorts)])]


def _check_lr(lr: object, where: str = "") -> None:
    """Refuses an ``lr`` that is not a finite real number > 0; ``where`` prefixes the message."""
    meaning = "a multiplier on the learned updates, 1.0 as trained"
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"{where}lr must be a real number ({meaning}); got {lr!r} of type {type(lr).__name__}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"{where}lr must be > 0 and finite ({meaning}); got {lr}")


class LearnedOptimizer(torch.optim.Optimizer):
    """Steps a model's parameters with a functional metaopt ``optimizer`` and its ``meta_params``.

    Every parameter coordinate is one row of the coordinatewise optimizer, so all parameters of a
    group (per device and dtype) go through it as one batched call: one concatenation of the
    gradients, one network call, one foreach add, one copy into the flat state; no per-parameter
    work. ``lr`` multiplies the updates (1.0 is the optimizer as meta-trained), so learning-rate
    schedulers and per-group rates work. Per-parameter state lives in ``self.state[p]`` (views into a
    flat buffer, shaped like ``p`` with the optimizer's state dimensions after it, as Adam's
    ``exp_avg``) like any torch optimizer's, so ``state_dict`` / ``load_state_dict`` resume a user's
    training exactly, and a state saved for parameters of other shapes is refused. Parameters of any
    memory format (``channels_last``, transposed views) are stepped in place; the state holds their
    coordinates in row-major order, so it is the same whatever the memory format.

    ``fused``, as in ``torch.optim.Adam``: the optimizer's one-pass step (``fused_step``: the native C
    step of hnn_seed, lstm and phnn in its usual shapes on float32 CPU tensors, built when the optimizer
    is constructed, with the system C compiler; phnn's Triton step on CUDA) in place of the batched
    update. ``None`` (default) uses it where it takes the tensors and the batched update elsewhere
    (float64, CUDA without a Triton step, and everywhere, after one warning, if it cannot be built);
    ``True`` requires it; ``False`` never uses it. The choice is made once per group of parameters.
    ``compile=True`` runs the batched update through ``torch.compile`` and falls back to eager, with a
    warning, where compilation fails. ``torch.compile(optimizer.step, fullgraph=True)`` traces the whole
    step, fused or batched, from the first one (which builds the state, as torch.optim's optimizers
    do); step counts stay tensors, so it does not recompile as the count grows.

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
        _check_lr(lr)
        if horizon is not None and (isinstance(horizon, bool) or not isinstance(horizon, numbers.Integral)):
            raise TypeError(f"horizon must be None or an int (the steps of the run); got {horizon!r}")
        if horizon is not None and horizon <= 0:
            raise ValueError(f"horizon must be > 0 (the steps of the run); got {horizon}")
        if fused is not None and not isinstance(fused, bool):
            raise TypeError(f"fused must be None, True or False; got {fused!r}")
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be True or False; got {compile!r}")
        if horizon is not None:
            optimizer = optimizer.with_horizon(horizon)
        if fused and optimizer.fused_kernel is None:
            raise ValueError(f"fused=True: optimizer {optimizer.kind!r} has no fused step; leave fused unset")
        if fused and compile:
            raise ValueError("fused=True and compile=True exclude each other: the fused step is not compiled")
        self.optimizer = optimizer
        self.fused = False if compile else fused  # the compiled update is never fused
        super().__init__(params, {"lr": lr})  # add_param_group checks and prepares every group
        self.meta_params = {k: v.detach().clone() for k, v in meta_params.items()}  # fixed from here on
        self._on_device: dict[tuple[torch.device, torch.dtype], MetaParams] = {}
        self._flat: dict[tuple[int, torch.device, torch.dtype], _FlatGroup] = {}
        # Parameters of one cohort have equal step counts, known without reading them (a traced step cannot):
        # 0 for a fresh state, the count of a loaded one, else the group build and run it last stepped in.
        self._step_cohorts: dict[Tensor, Hashable] = {}
        self._builds = 0
        self._update = torch.compile(optimizer.update) if compile else None

    def add_param_group(self, param_group: dict) -> None:
        """``torch.optim.Optimizer.add_param_group``, refusing a group whose ``lr`` or parameters the learned
        optimizer cannot step (the constructor adds its groups through it too)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_lr(group["lr"], f"param group {len(self.param_groups) - 1}: ")
            for param in group["params"]:
                if param.is_complex():
                    dtype = str(param.dtype).removeprefix("torch.")
                    raise TypeError(
                        f"LearnedOptimizer does not support complex parameters (got a {dtype} parameter of shape "
                        f"{list(param.shape)}); view it as real with torch.view_as_real"
                    )
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        if self.fused is not False:
            # Build the fused kernel now, eagerly: a first step under torch.compile can only look it up.
            for device, dtype in {(param.device, param.dtype) for param in group["params"]}:
                fused_refusal(self.optimizer, [torch.empty(0, device=device, dtype=dtype)])

    def load_state_dict(self, state_dict: dict) -> None:
        self._check_state_dict(state_dict)
        super().load_state_dict(state_dict)
        self._flat.clear()  # the loaded state replaced the views into the flat buffers
        self._step_cohorts = {param: int(state[STEP]) for param, state in self.state.items()}

    def _check_state_dict(self, state_dict: dict) -> None:
        """Refuses a state dict saved for other parameters (their number per group, or their shapes) or by
        another optimizer, naming the first parameter that does not match."""
        saved_groups, groups = state_dict["param_groups"], self.param_groups
        if len(saved_groups) != len(groups):
            raise ValueError(
                f"state_dict holds {len(saved_groups)} parameter groups, but this LearnedOptimizer has "
                f"{len(groups)}: it was saved for another model or another split into groups"
            )
        for number, (saved, group) in enumerate(zip(saved_groups, groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"state_dict holds {len(saved['params'])} parameters in group {number}, but this "
                    f"LearnedOptimizer has {len(group['params'])}: it was saved for another model"
                )
        indices = itertools.chain.from_iterable(saved["params"] for saved in saved_groups)
        params = dict(zip(indices, itertools.chain.from_iterable(group["params"] for group in groups)))
        names = itertools.chain.from_iterable(
            group.get("param_names", [None] * len(group["params"])) for group in groups
        )
        param_names = dict(zip(params, names))
        state_dims = {key: value.shape[1:] for key, value in self.optimizer.init_state(torch.zeros(1)).items()}
        expected = sorted(state_dims)
        for index, param_state in state_dict.get("state", {}).items():
            found = sorted(set(param_state) - {STEP})
            if found != expected:
                raise ValueError(
                    f"state_dict holds state {found} for parameter {index}, but a {self.optimizer.kind!r} "
                    f"LearnedOptimizer keeps {expected}: it was saved by another optimizer or an older metaopt "
                    "(lstm kept 'h' and 'c' before they became one 'hc')"
                )
            if index not in params:
                raise ValueError(f"state_dict holds state for parameter {index}, which none of its param_groups lists")
            param = params[index]
            named = f" ({param_names[index]})" if param_names[index] else ""
            for key, dims in state_dims.items():
                shape, needed = tuple(param_state[key].shape), (*param.shape, *dims)
                if shape == needed:
                    continue
                if shape == (param.numel(), *dims):
                    # Refused, not reshaped: flat state is what cannot tell this model's state from another's
                    # (a [2, 6] and a [4, 3] weight both flatten to [12]), so taking it would let one weight's
                    # state drive another's; its parameters can still resume with a fresh optimizer state.
                    raise ValueError(
                        f"state_dict holds flat state {key!r} of shape {list(shape)} for parameter {index}"
                        f"{named} of shape {list(param.shape)}: it was saved by an older metaopt, whose flat "
                        "state cannot be checked against the model; resume without loading the optimizer state"
                    )
                raise ValueError(
                    f"state_dict holds state {key!r} of shape {list(shape)} for parameter {index}{named} of "
                    f"shape {list(param.shape)}, which needs {list(needed)}: it was saved for another model"
                )
            if param_state.get(STEP) is None:
                raise ValueError(f"state_dict holds no {STEP!r} count for parameter {index}{named}")

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
                # Each parameter in its row-major order, as its state keeps it: a non-contiguous one
                # (channels_last, a transposed view) is stepped in a contiguous copy, copied back below.
                staged = [param if param.is_contiguous() else param.contiguous() for param in params]
                flat_params = [param.view(-1) for param in staged]
                grads = [param.grad.reshape(-1) for param in params]
                flat = self._flat_group((index, device, dtype), params, flat_params, grads)
                self._step_flat(flat, flat_params, grads, group["lr"], self._meta_params(device, dtype))
                for param, copy in zip(params, staged):
                    if not param.is_contiguous():
                        param.copy_(copy)
        return loss

    def _flat_group(
        self,
        key: tuple[int, torch.device, torch.dtype],
        params: list[Tensor],
        flat_params: list[Tensor],
        grads: list[Tensor],
    ) -> _FlatGroup:
        """The cached flat state of ``params``, rebuilt when the set of parameters changed or a state dict
        was loaded; ``flat_params`` and ``grads``: the tensors the step gets, which decide the fused step."""
        param_ids = tuple(map(id, params))
        flat = self._flat.get(key)
        if flat is not None and flat.param_ids == param_ids:
            return flat
        sizes = [p.numel() for p in params]
        for param in params:  # only when (re)building: fresh parameters get a fresh state
            if not self.state[param]:
                self.state[param].update(self.optimizer.init_state(param.new_zeros(param.shape)))
                self.state[param][STEP] = torch.zeros((), dtype=torch.int64)
                self._step_cohorts[param] = 0
        keys = [k for k in self.state[params[0]] if k != STEP]
        state = {
            k: torch.cat([self.state[p][k].reshape(p.numel(), *self.state[p][k].shape[p.dim() :]) for p in params])
            for k in keys
        }
        steps = torch.stack([self.state[p][STEP].reshape(()) for p in params])
        for param, step_view, *chunks in zip(params, steps.unbind(), *(state[k].split(sizes) for k in keys)):
            self.state[param].update((k, chunk.view(*param.shape, *chunk.shape[1:])) for k, chunk in zip(keys, chunks))
            self.state[param][STEP] = step_view
        # Parameters of a group step together, so the runs hold until the group is rebuilt.
        runs = _equal_step_runs([self._step_cohorts[p] for p in params], sizes)
        self._builds += 1
        for start, end, _, _ in runs:
            for param in params[start:end]:
                self._step_cohorts[param] = (self._builds, start)
        fused = False
        if self.fused is not False:
            refusal = fused_refusal(self.optimizer, [*flat_params, *grads, *state.values()])
            if refusal is not None and self.fused:
                raise RuntimeError(f"fused=True, but the fused {self.optimizer.kind} step cannot run: {refusal}")
            fused = refusal is None
        weights = self.optimizer.fused_weights(self._meta_params(*key[1:])) if fused else None
        flat = _FlatGroup(param_ids, sizes, state, steps, runs, weights)
        self._flat[key] = flat
        return flat

    def _step_flat(
        self, flat: _FlatGroup, params: list[Tensor], grads: list[Tensor], lr: float, meta_params: MetaParams
    ) -> None:
        """One update of a flat group (``params`` and ``grads`` flat, in place), its state buffers overwritten in
        place. Each parameter follows its own step count: parameters that skipped steps (no ``.grad``) are
        updated apart from the others."""
        for start, end, first, last in flat.runs:
            state = {key: value[first:last] for key, value in flat.state.items()}
            self._step_run(
                params[start:end],
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
