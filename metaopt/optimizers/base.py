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

import inspect
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from metaopt.optimizers.native import FusedUnsupported

OptState = dict[str, Tensor]
MetaParams = dict[str, Tensor]


class Optimizer(ABC):
    """A coordinatewise optimizer in functional form (learned_optimization's ``LearnedOptimizer``)."""

    kind: ClassVar[str]
    learned: ClassVar[bool] = False
    has_fused_step: ClassVar[bool] = False

    def init_meta_params(self, seed: int = 0) -> MetaParams:
        """The meta-parameters a meta-trainer learns; empty for hand-designed optimizers."""
        return {}

    @abstractmethod
    def init_state(self, params: Tensor) -> OptState:
        """Per-coordinate state for parameters shaped like ``params``."""

    @abstractmethod
    def update(
        self, meta_params: MetaParams, grads: Tensor, state: OptState, step: int
    ) -> tuple[Tensor, OptState]:
        """Additive updates for ``grads`` at 0-based ``step`` and the next state."""

    def fused_step(self, meta_params: MetaParams, params: list[Tensor], grads: list[Tensor], state: OptState,
                   step: int, lr: float) -> None:
        """``params[i] += lr · update`` in place, and ``state`` (flat over all of ``params``, in order)
        overwritten, in one native pass; for optimizers with ``has_fused_step``. Raises
        ``FusedUnsupported`` for inputs it does not take (device, dtype) and ``NativeUnavailable``
        where its kernel cannot be built."""
        raise FusedUnsupported(f"optimizer {self.kind!r} has no fused step")

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
