"""MNIST MLP optimizees (784 → hidden… → 10, cross-entropy), as in the L2L and OPT-ML experiments."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from metaopt.tasks.base import Optimizees, Split, TaskFamily, hash_uniform_indices, seeded_generator
from metaopt.tasks.data import DataSplit, mnist_half

Activation = Literal["sigmoid", "relu", "tanh"]
ACTIVATIONS = {"sigmoid": torch.sigmoid, "relu": torch.relu, "tanh": torch.tanh}
INPUT_SIZE, NUM_CLASSES = 28 * 28, 10
INIT_SCALE = 0.001  # init "normal": weights ~ N(0, 0.001²), biases 0


class MnistMLP(TaskFamily):
    """An MLP on MNIST; every optimizee has its own initialisation and minibatch stream.

    ``half`` picks the meta-train or meta-test half of the data: optimizers are meta-trained on
    the one and judged on the other. ``data`` passes that half as (pixels [N, 784], labels [N])
    already loaded (Ray workers get it from the object store) instead of reading ``root``. ``init``:
    weights ~ N(0, 0.001²) and zero biases (``normal``), or ``torch.nn.Linear``'s default (``pytorch``,
    as OPT-ML's optimizee): weights and biases ~ U(±1/√fan_in).
    """

    name = "mnist_mlp"

    def __init__(
        self,
        activation: Activation = "sigmoid",
        hidden_sizes: Sequence[int] = (20,),
        batch_size: int = 128,
        init: Literal["normal", "pytorch"] = "normal",
        root: str = "data",
        split: DataSplit = "train",
        download: bool = True,
        half: Split = "meta_train",
        device: torch.device | str = "cpu",
        data: tuple[Tensor, Tensor] | None = None,
    ):
        super().__init__(device)
        self.activation = activation
        self.hidden_sizes = list(hidden_sizes)
        self.batch_size = batch_size
        self.init = init
        self.split = split
        self.half = half
        sizes = [INPUT_SIZE, *self.hidden_sizes, NUM_CLASSES]
        self.layer_shapes = [(fan_in, fan_out) for fan_in, fan_out in zip(sizes[:-1], sizes[1:])]
        self.num_params = sum(fan_in * fan_out + fan_out for fan_in, fan_out in self.layer_shapes)
        pixels, labels = data if data is not None else mnist_half(root, split, download, half)
        self.pixels, self.labels = pixels.to(self.device), labels.to(self.device)

    def sample(self, seeds: Sequence[int]) -> Optimizees:
        params = []
        for seed in seeds:  # setup only: the optimization itself is one batched computation
            generator = seeded_generator(seed)
            chunks = []
            for fan_in, fan_out in self.layer_shapes:
                if self.init == "normal":
                    chunks += [torch.randn(fan_in * fan_out, generator=generator) * INIT_SCALE, torch.zeros(fan_out)]
                else:
                    bound = fan_in**-0.5
                    chunks.append((torch.rand(fan_in * fan_out + fan_out, generator=generator) * 2 - 1) * bound)
            params.append(torch.cat(chunks))
        return Optimizees(
            seeds=torch.tensor(list(seeds), dtype=torch.int64, device=self.device),
            params=torch.stack(params).to(self.device),
        )

    def batch(self, optimizees: Optimizees, step: int) -> dict[str, Tensor]:
        index = hash_uniform_indices(optimizees.seeds, step, self.batch_size, len(self.labels))
        return {"x": self.pixels[index], "y": self.labels[index]}

    def logits(self, params: Tensor, x: Tensor) -> Tensor:
        """Logits of one MLP with flat ``params`` on inputs ``x`` [batch, 784]."""
        act = ACTIVATIONS[self.activation]
        offset = 0
        for layer, (fan_in, fan_out) in enumerate(self.layer_shapes):
            weight = params[offset : offset + fan_in * fan_out].view(fan_in, fan_out)
            offset += fan_in * fan_out
            bias = params[offset : offset + fan_out]
            offset += fan_out
            x = x @ weight + bias
            if layer < len(self.layer_shapes) - 1:
                x = act(x)
        return x

    def loss(self, params: Tensor, data: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(self.logits(params, batch["x"]), batch["y"])

    def spec(self) -> dict:
        return {
            **super().spec(),
            "activation": self.activation,
            "hidden_sizes": self.hidden_sizes,
            "batch_size": self.batch_size,
            "init": self.init,
            "split": self.split,
            "half": self.half,
        }
