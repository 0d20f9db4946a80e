"""Optimizee task families, and mixtures of them to meta-train on."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from metaopt.tasks import families
from metaopt.tasks.base import Optimizees, Split, TaskFamily, optimizee_seeds
from metaopt.tasks.data import DataNotFoundError, load_mnist, mnist_half
from metaopt.tasks.mlp import MnistMLP
from metaopt.tasks.module import ModuleTask, ModuleTaskSpec, TaskFactoryError, call_factory
from metaopt.tasks.quadratic import Quadratic

IMAGE_KINDS = ("image_mlp", "image_cnn")  # sampled kinds on MNIST images; the others generate their data
SAMPLED_KINDS = (*IMAGE_KINDS, "markov_transformer", "char_lm", "teacher_student")


def make_task(config, half: Split, device: torch.device | str = "cpu", data=None, seed: int = 0) -> TaskFamily:
    """The task family a task config describes, on the ``half`` of its data (meta-train or meta-test).

    ``data``: the task's data already loaded (see ``task_data``), for tasks that read data; ``seed``: the
    task seed that draws a sampled kind's configuration (and generated data).
    """
    if config.kind == "quadratic":
        return Quadratic(dim=config.dim, device=device)
    if config.kind == "mnist_mlp":
        return MnistMLP(
            activation=config.activation,
            hidden_sizes=config.hidden_sizes,
            batch_size=config.batch_size,
            init=config.init,
            root=config.data.root,
            split=config.data.split,
            download=config.data.download,
            half=half,
            device=device,
            data=data,
        )
    if config.kind == "module":
        return ModuleTask(call_factory(config.factory), config.batch_size, half, device)
    if config.kind in SAMPLED_KINDS:
        choice = config.choose(seed)
        batch_size = choice.pop("batch_size")
        if config.kind in IMAGE_KINDS:
            images, labels = data if data is not None else load_mnist(**config.data.model_dump())
            spec = getattr(families, config.kind)(torch.as_tensor(images), torch.as_tensor(labels), **choice)
        else:
            spec = getattr(families, config.kind)(seed=seed, **choice)
        return ModuleTask(spec, batch_size, half, device, config.parameter_scale)
    allowed = ", ".join(("quadratic", "mnist_mlp", "module", *SAMPLED_KINDS))
    raise ValueError(f"unknown task kind {config.kind!r}; allowed: {allowed}")


def task_data(config, half: Split) -> tuple[np.ndarray, np.ndarray] | None:
    """A task's data as NumPy arrays (for Ray's object store): MNIST's ``half`` for ``mnist_mlp``, the whole
    split for the sampled image kinds (their tasks split it), None for tasks that read no data."""
    if config.kind == "mnist_mlp":
        pixels, labels = mnist_half(config.data.root, config.data.split, config.data.download, half)
        return pixels.numpy(), labels.numpy()
    if config.kind in IMAGE_KINDS:
        images, labels = load_mnist(**config.data.model_dump())
        return images.numpy(), labels.numpy()
    return None


class TaskMixture:
    """Families to meta-train on, by weight: each episode draws one, and a configuration of it, from
    (``seed``, ``stream``, episode), so every Ray worker (its own ``stream``) trains on its own tasks. All the
    optimizees of an episode share one family, so optimizees of different shapes are never batched together.
    """

    def __init__(
        self,
        tasks: Sequence,
        weights: Sequence[float],
        half: Split,
        device: torch.device | str = "cpu",
        data: Sequence | None = None,
        seed: int = 0,
        stream: int = 0,
        cached: int = 8,
    ):
        self.tasks, self.half, self.device = list(tasks), half, device
        self.probabilities = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        self.data = list(data) if data is not None else [None] * len(self.tasks)
        self.seed, self.stream, self.cached = seed, stream, cached
        self.built: OrderedDict[str, TaskFamily] = OrderedDict()  # the most recently used families

    def draw(self, episode: int) -> tuple[int, int]:
        """The mixture member and the task seed of ``episode``."""
        rng = np.random.default_rng([self.seed, self.stream, episode])
        return int(rng.choice(len(self.tasks), p=self.probabilities)), int(rng.integers(2**31))

    def episode_family(self, episode: int) -> TaskFamily:
        index, task_seed = self.draw(episode)
        config = self.tasks[index]
        if config.kind not in SAMPLED_KINDS:
            key = json.dumps([index])
        elif config.kind in IMAGE_KINDS:  # their data does not depend on the seed: one family per configuration
            key = json.dumps([index, config.choose(task_seed)])
        else:
            key = json.dumps([index, task_seed])
        if key not in self.built:
            self.built[key] = make_task(config, self.half, self.device, self.data[index], seed=task_seed)
            if len(self.built) > self.cached:
                self.built.popitem(last=False)
        self.built.move_to_end(key)
        return self.built[key]


__all__ = [
    "DataNotFoundError",
    "MnistMLP",
    "ModuleTask",
    "ModuleTaskSpec",
    "Optimizees",
    "Quadratic",
    "Split",
    "TaskFactoryError",
    "TaskFamily",
    "TaskMixture",
    "make_task",
    "optimizee_seeds",
    "task_data",
]
