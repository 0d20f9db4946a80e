"""The functional, coordinatewise optimizer interface shared by every optimizer in metaopt.

An optimizer never owns parameters. It maps gradients (any shape: one optimizee ``[n]`` or a
batch of optimizees ``[B, n]``) and its state to additive updates, treating every coordinate the
same way, so one small network serves models of any size::

    meta_params = opt.init_meta_params(seed)        # {} for hand-designed optimizers
    state = opt.init_state(params)
    updates, state = opt.update(meta_params, grads, state, step)
    params = params + updates
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from metaopt.optimizers.native import FusedUnsupported, NativeUnavailable, library
from metaopt.optimizers.ops import KernelOps

OptState = dict[str, Tensor]
MetaParams = dict[str, Tensor]


class Optimizer(ABC):
    """A coordinatewise optimizer in functional form (learned_optimization's ``LearnedOptimizer``)."""

    kind: ClassVar[str]
    learned: ClassVar[bool] = False
    fused_kernel: ClassVar[KernelOps | None] = None  # the metaopt:: ops of its fused step (csrc/{kernel}.c)
    horizon: int | None = None  # the steps of a run a learned step schedule spans; None without one

    def init_meta_params(self, seed: int = 0) -> MetaParams:
        """The meta-parameters a meta-trainer learns; empty for hand-designed optimizers."""
        return {}

    @abstractmethod
    def init_state(self, params: Tensor) -> OptState:
        """Per-coordinate state for parameters shaped like ``params``."""

    @abstractmethod
    def update(self, meta_params: MetaParams, grads: Tensor, state: OptState, step: int) -> tuple[Tensor, OptState]:
        """Additive updates for ``grads`` at 0-based ``step`` and the next state."""

    def fused_step(
        self,
        meta_params: MetaParams,
        params: list[Tensor],
        grads: list[Tensor],
        state: OptState,
        step: int | Tensor,
        lr: float,
        weights: Tensor | None = None,
    ) -> None:
        """``params[i] += lr · update`` in place, and ``state`` (flat over all of ``params``, in order)
        overwritten, in one pass of the native kernel (the op ``metaopt::{kernel}_``); ``weights``: the
        packed weights (``fused_weights(meta_params)``) where the caller keeps them. Raises
        ``FusedUnsupported`` for inputs or options it does not take and ``NativeUnavailable`` where it
        cannot be built."""
        refused = self._fused_unsupported()
        if refused:
            raise FusedUnsupported(refused)
        scalars, settings = self._fused_scalars(meta_params, step, lr)
        weights = self.fused_weights(meta_params) if weights is None else weights
        states = [state[key] for key in self.init_state(torch.zeros(0))]
        self.fused_kernel.step_(params, grads, states, weights, scalars, **settings)

    def _fused_unsupported(self) -> str | None:
        """Why ``fused_kernel`` does not take this optimizer's options, or None where it does."""
        return None

    def fused_weights(self, meta_params: MetaParams) -> Tensor:
        """The meta-parameters packed into the kernel's float32 weights (differentiable), for options it
        takes: the same at every step."""
        raise NotImplementedError(f"optimizer {self.kind!r} has no fused step")

    def _fused_scalars(self, meta_params: MetaParams, step: int | Tensor, lr: float) -> tuple[Tensor, dict[str, Any]]:
        """The kernel ops' ``scalars`` (a differentiable function of ``meta_params``, ``step`` and ``lr``)
        and keyword settings."""
        raise NotImplementedError(f"optimizer {self.kind!r} has no fused step")

    def _fused_inputs(
        self, meta_params: MetaParams, step: int | Tensor, lr: float
    ) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """The kernel ops' inputs: the packed weights, ``scalars`` and the keyword settings."""
        return self.fused_weights(meta_params), *self._fused_scalars(meta_params, step, lr)

    def update_no_grad(
        self, meta_params: MetaParams, grads: Tensor, state: OptState, step: int
    ) -> tuple[Tensor, OptState]:
        """``update`` where nothing needs a gradient (evaluation, ES): one pass of the fused step where it
        takes the tensors (float32 on the CPU, or on CUDA for a kernel with a Triton step; the options it
        covers), else ``update``."""
        if fused_refusal(self, [grads, *state.values()]) is None:
            return self._fused_update(meta_params, grads, state, step)
        return self.update(meta_params, grads, state, step)

    def _fused_update(
        self, meta_params: MetaParams, grads: Tensor, state: OptState, step: int
    ) -> tuple[Tensor, OptState]:
        """One pass of the op ``metaopt::{kernel}`` into new tensors: the update and the next state."""
        weights, scalars, settings = self._fused_inputs(meta_params, step, 1.0)
        keys = list(state)
        updates, new_states = self.fused_kernel.step(
            grads.contiguous(), [state[key] for key in keys], weights, scalars, **settings
        )
        return updates, dict(zip(keys, new_states))

    def update_particles(
        self, meta_params: MetaParams, grads: Tensor, state: OptState, step: int
    ) -> tuple[Tensor, OptState]:
        """``update_no_grad`` for P particles that each have their own meta-parameters: every tensor
        argument has a leading axis of size P. Vectorised with ``torch.func.vmap``, except where the fused
        kernel takes the options and tensors (float32 CPU): it then runs once per particle."""
        particles = [{k: v[i] for k, v in meta_params.items()} for i in range(len(grads))]
        if fused_refusal(self, [grads, *state.values()]) is not None:
            return torch.func.vmap(self.update, in_dims=(0, 0, 0, None))(meta_params, grads, state, step)
        results = [
            self.update_no_grad(particle, grads[i], {k: v[i] for k, v in state.items()}, step)
            for i, particle in enumerate(particles)
        ]
        return torch.stack([updates for updates, _ in results]), {
            key: torch.stack([new_state[key] for _, new_state in results]) for key in state
        }

    def with_horizon(self, horizon: int) -> Optimizer:
        """The same optimizer with its learned step schedule stretched over runs of ``horizon`` steps;
        an optimizer without one refuses."""
        raise ValueError(
            f"horizon={horizon}: optimizer {self.kind!r} has no learned step schedule; leave horizon unset"
        )

    def spanning(self, steps: int) -> Optimizer:
        """This optimizer for runs of ``steps`` steps: its learned step schedule, if it has one, stretched
        over them."""
        return self if self.horizon in (None, steps) else self.with_horizon(steps)

    def hyperparameters(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this optimizer (JSON-serialisable)."""
        names = inspect.signature(type(self).__init__).parameters
        return {name: getattr(self, name) for name in names if name != "self"}

    def spec(self) -> dict[str, Any]:
        """A JSON spec: kind and hyperparameters."""
        return {"kind": self.kind, "hyperparameters": self.hyperparameters()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"


class NetworkOptimizer(Optimizer):
    """A learned optimizer whose meta-parameters are the parameters of a small ``torch.nn.Module``.

    Subclasses implement ``build_network()`` and call ``self.apply(meta_params, *inputs)`` (or
    ``torch.func.functional_call(self.network, meta_params, ...)``) inside ``update``; the module
    itself is only a template and its own parameters are never used.
    """

    learned = True

    def __init__(self):
        self.network = self.build_network()

    @abstractmethod
    def build_network(self) -> nn.Module:
        """A fresh network with its default initialisation."""

    def init_meta_params(self, seed: int = 0) -> MetaParams:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            network = self.build_network()
        return {name: p.detach().clone() for name, p in network.named_parameters()}

    def num_meta_params(self) -> int:
        """How many scalars the optimizer learns."""
        return sum(p.numel() for p in self.network.parameters())

    def apply(self, meta_params: MetaParams, *inputs: Tensor, **kwargs) -> Tensor:
        """Run the network with ``meta_params`` in place of its own parameters."""
        return torch.func.functional_call(self.network, meta_params, inputs, kwargs)

    def _fused_meta_supported(self) -> bool:
        """Whether the backward kernel takes this optimizer's options."""
        return False

    def _fused_meta_update(
        self, meta_params: MetaParams, grads: Tensor, state: OptState, step: int
    ) -> tuple[Tensor, OptState] | None:
        """The update as the kernel's op, whose registered autograd is the hand-written backward kernel, for
        first-order meta-training on float32 tensors the kernel takes (CPU; CUDA for a kernel with a Triton
        implementation); None where it does not apply (the batched update then runs)."""
        if not (
            self._fused_meta_supported()
            and torch.is_grad_enabled()
            and any(v.requires_grad for v in meta_params.values())
            and not grads.requires_grad
            and fused_refusal(self, [grads, *state.values(), *meta_params.values()]) is None
        ):
            return None
        return self._fused_update(meta_params, grads, {k: v.contiguous() for k, v in state.items()}, step)


def fused_refusal(optimizer: Optimizer, tensors: list[Tensor]) -> str | None:
    """Why ``optimizer``'s fused step cannot step ``tensors`` (parameters, gradients, state), or None when it
    can: the one place that decides between the fused step and the batched update, as ``torch.optim`` does in
    ``_default_to_fused_or_foreach``. The fused step needs options it takes and contiguous float32 tensors,
    on the CPU with a C compiler (the native kernel), or on CUDA with Triton (kernels with a Triton
    implementation); where the kernel cannot be built or Triton is missing, this warns once and the batched
    update runs."""
    ops = optimizer.fused_kernel
    if ops is None:
        return f"optimizer {optimizer.kind!r} has no fused step"
    devices = {t.device.type for t in tensors}
    on_cuda = devices == {"cuda"} and ops.cuda is not None
    if not (devices <= {"cpu"} or on_cuda) or not all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors):
        where = "CPU or CUDA" if ops.cuda else "CPU"
        return f"the fused step ({ops.kernel}) takes contiguous float32 {where} tensors only"
    refused = optimizer._fused_unsupported()
    if refused:
        return refused
    try:
        _cuda_module(ops.cuda) if on_cuda else library(ops.kernel)
    except NativeUnavailable as error:
        if not getattr(error, "warned", False):  # the same error comes back on every later call
            warnings.warn(f"{optimizer.kind} runs the batched update: the fused kernel cannot be built ({error})")
            error.warned = True
        return str(error)
    return None


_cuda_modules: dict[str, object] = {}


def _cuda_module(name: str) -> object:
    """The module of a kernel's Triton implementation; ``NativeUnavailable`` (the same one on every later
    call) where Triton cannot be imported."""
    if name not in _cuda_modules:
        try:
            _cuda_modules[name] = importlib.import_module(name)
        except ImportError as error:
            _cuda_modules[name] = NativeUnavailable(f"Triton is not available ({error})")
    found = _cuda_modules[name]
    if isinstance(found, NativeUnavailable):
        raise found
    return found
