"""Optimizees from any ``torch.nn.Module``: a model factory, a dataset and a loss make a task family.

Many optimizees run as one batched computation through ``torch.func``: ``stack_module_state`` gathers
their initial parameters and ``functional_call`` under ``vmap`` runs the module's own forward, so no
forward pass is written by hand per architecture. A user's task is a function named in a config as
``package.module:function`` that returns a ``ModuleTaskSpec``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from metaopt.tasks.base import Optimizees, Split, TaskFamily, hash_uniform_indices
from metaopt.tasks.data import meta_split_indices


@dataclass
class ModuleTaskSpec:
    """A task from a module: ``model()`` builds one optimizee's network (its initialisation is drawn from
    torch's global RNG, which metaopt seeds per optimizee), ``inputs`` and ``targets`` are the dataset
    (examples along the first dimension) and ``loss(outputs, targets)`` is a scalar.

    Optionally, held-out ``validation_inputs`` and ``validation_targets`` (disjoint from the training
    examples: what a benchmark scored on validation data evaluates) and ``metric(outputs, targets)``, a
    scalar where higher is better (accuracy), reported beside the validation loss."""

    model: Callable[[], nn.Module]
    inputs: Tensor
    targets: Tensor
    loss: Callable[[Tensor, Tensor], Tensor]
    validation_inputs: Tensor | None = None
    validation_targets: Tensor | None = None
    metric: Callable[[Tensor, Tensor], Tensor] | None = None


class TaskFactoryError(ValueError):
    """A task factory raised, or returned something other than a ``ModuleTaskSpec``."""


def call_factory(path: str) -> ModuleTaskSpec:
    """The ``ModuleTaskSpec`` that the function at ``path`` returns; ``TaskFactoryError`` names it otherwise."""
    factory = load_factory(path)
    try:
        spec = factory()
    except Exception as error:
        raise TaskFactoryError(f"task.factory {path!r} raised {type(error).__name__}: {error}") from error
    if not isinstance(spec, ModuleTaskSpec):
        raise TaskFactoryError(
            f"task.factory {path!r} returned a {type(spec).__name__}, not a metaopt.tasks.ModuleTaskSpec "
            "(model, inputs, targets, loss)"
        )
    return spec


def load_factory(path: str) -> Callable[[], ModuleTaskSpec]:
    """The function at ``package.module:function``, with errors that say what is missing."""
    module_name, _, function_name = path.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"task factory {path!r}: expected package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"task factory {path!r}: cannot import {module_name!r} ({error})") from None
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise ValueError(f"task factory {path!r}: {module_name} has no function {function_name!r}")
    return factory


class ModuleTask(TaskFamily):
    """Optimizees of one architecture: each seed draws its own initialisation and minibatch stream.

    ``half`` picks the meta-train or meta-test half of the dataset (a fixed split, as MNIST's), so
    optimizers are judged on examples they never trained on. The flat parameters concatenate the
    module's parameters in ``named_parameters`` order; ``parameter_shapes`` names them, so a learned
    optimizer can tell tensors apart. Other buffers keep their initial values; batch norm normalises with
    each minibatch's statistics, as in training mode.
    """

    name = "module"

    def __init__(
        self,
        spec: ModuleTaskSpec,
        batch_size: int = 32,
        half: Split = "meta_train",
        device: torch.device | str = "cpu",
        parameter_scale: float = 1.0,
    ):
        super().__init__(device)
        if len(spec.inputs) != len(spec.targets) or len(spec.inputs) < 2:
            raise ValueError(
                f"a module task needs as many targets as inputs, at least 2: got {len(spec.inputs)} inputs "
                f"and {len(spec.targets)} targets"
            )
        self.definition = spec
        self.batch_size = batch_size
        self.half = half
        self.parameter_scale = parameter_scale
        self.template = spec.model().to(self.device)
        # Batch norm normalises with each minibatch's statistics: running statistics, updated in place, cannot be
        # batched over optimizees (torch.func's own fix).
        torch.func.replace_all_batch_norm_modules_(self.template)
        self.parameter_shapes = {name: tuple(p.shape) for name, p in self.template.named_parameters()}
        self.sizes = [p.numel() for p in self.template.parameters()]
        self.num_params = sum(self.sizes)
        self.buffers = dict(self.template.named_buffers())
        index = torch.from_numpy(meta_split_indices(len(spec.inputs), half))
        self.inputs, self.targets = spec.inputs[index].to(self.device), spec.targets[index].to(self.device)

    def sample(self, seeds: Sequence[int]) -> Optimizees:
        models = []
        for seed in seeds:  # setup only: the optimization itself is one batched computation
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                models.append(self.definition.model())
        stacked, _ = torch.func.stack_module_state(models)
        params = torch.cat([stacked[name].detach().reshape(len(models), -1) for name in self.parameter_shapes], 1)
        data = {}
        if self.parameter_scale != 1.0:  # the optimizer sees θ / s and the model runs on s · (θ / s)
            data["scale"] = self._tensor_scales(seeds)
            params = params / data["scale"]
        return Optimizees(
            seeds=torch.tensor(list(seeds), dtype=torch.int64, device=self.device),
            params=params.to(self.device),
            data={k: v.to(self.device) for k, v in data.items()},
        )

    def _tensor_scales(self, seeds: Sequence[int]) -> Tensor:
        """Per optimizee, one factor per parameter tensor, log-uniform in [1/parameter_scale, parameter_scale],
        spread over that tensor's coordinates: ``[B, n]``."""
        exponents = np.stack([np.random.default_rng([seed, 2]).uniform(-1, 1, len(self.sizes)) for seed in seeds])
        scales = torch.from_numpy(self.parameter_scale**exponents).float()
        return torch.repeat_interleave(scales, torch.tensor(self.sizes), dim=1)

    def batch(self, optimizees: Optimizees, step: int) -> dict[str, Tensor]:
        index = hash_uniform_indices(optimizees.seeds, step, self.batch_size, len(self.targets))
        return {"x": self.inputs[index], "y": self.targets[index]}

    def loss(self, params: Tensor, data: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        if "scale" in data:
            params = params * data["scale"]
        tensors = {
            name: chunk.view(shape)
            for (name, shape), chunk in zip(self.parameter_shapes.items(), params.split(self.sizes))
        }
        outputs = torch.func.functional_call(self.template, (tensors, self.buffers), (batch["x"],))
        return self.definition.loss(outputs, batch["y"])

    def spec(self) -> dict:
        return {
            **super().spec(),
            "batch_size": self.batch_size,
            "half": self.half,
            "parameter_scale": self.parameter_scale,
            "parameters": {name: list(shape) for name, shape in self.parameter_shapes.items()},
        }
