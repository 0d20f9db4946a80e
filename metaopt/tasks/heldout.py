"""Held-out tasks for ``metaopt benchmark``: small models nobody meta-trains on.

Each function returns a ``ModuleTaskSpec``. The data are scikit-learn's bundled datasets (shipped with the
package, no download) with standardised features, or synthetic sequences drawn from a fixed seed. Every
model is built from plain ``nn`` modules without dropout, so ``torch.func`` batches it over optimizees.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from metaopt.tasks.families import mlp
from metaopt.tasks.module import ModuleTaskSpec

SEQUENCE_EXAMPLES = 1024
SEQUENCE_SEED = 0


def _standardised(features: np.ndarray) -> Tensor:
    """Features as float32, each with mean 0 and standard deviation 1 over the dataset."""
    features = torch.as_tensor(features, dtype=torch.float32)
    return (features - features.mean(0)) / features.std(0).clamp_min(1e-8)


def _sklearn_classification(name: str) -> tuple[Tensor, Tensor]:
    """A bundled scikit-learn classification dataset: standardised features [N, d] and labels [N]."""
    from sklearn import datasets

    data = getattr(datasets, f"load_{name}")()
    return _standardised(data.data), torch.as_tensor(data.target, dtype=torch.int64)


def _classification(inputs: Tensor, targets: Tensor, model) -> ModuleTaskSpec:
    return ModuleTaskSpec(model=model, inputs=inputs, targets=targets, loss=nn.functional.cross_entropy)


def wine_mlp() -> ModuleTaskSpec:
    """Wine cultivars (178 wines, 13 chemical measurements, 3 classes): an MLP 13 → 32 → 3 (tanh)."""
    inputs, targets = _sklearn_classification("wine")
    return _classification(inputs, targets, lambda: mlp([13, 32, 3], "tanh"))


def breast_cancer_mlp() -> ModuleTaskSpec:
    """Breast cancer diagnosis (569 tumours, 30 features, 2 classes): an MLP 30 → 32 → 32 → 2 (ReLU)."""
    inputs, targets = _sklearn_classification("breast_cancer")
    return _classification(inputs, targets, lambda: mlp([30, 32, 32, 2], "relu"))


def iris_logistic() -> ModuleTaskSpec:
    """Iris species (150 flowers, 4 measurements, 3 classes): multinomial logistic regression."""
    inputs, targets = _sklearn_classification("iris")
    return _classification(inputs, targets, lambda: nn.Linear(4, 3))


def diabetes_regression() -> ModuleTaskSpec:
    """Diabetes progression (442 patients, 10 features, standardised target): an MLP 10 → 32 → 1, squared error."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    inputs, targets = _standardised(data.data), _standardised(data.target[:, None])
    return ModuleTaskSpec(
        model=lambda: mlp([10, 32, 1], "tanh"), inputs=inputs, targets=targets, loss=nn.functional.mse_loss
    )


def _digits() -> tuple[Tensor, Tensor]:
    """Handwritten digits (1,797 images of 8×8 pixels, 10 classes): standardised pixels [N, 64], labels."""
    return _sklearn_classification("digits")


def digits_mlp() -> ModuleTaskSpec:
    """Digits as 64 pixels: an MLP 64 → 32 → 10 (ReLU)."""
    inputs, targets = _digits()
    return _classification(inputs, targets, lambda: mlp([64, 32, 10], "relu"))


def digits_cnn() -> ModuleTaskSpec:
    """Digits as 1×8×8 images: two 3×3 convolutions (8 channels, the second with stride 2), ReLU, a linear read-out."""
    inputs, targets = _digits()

    def model() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * 4 * 4, 10),
        )

    return _classification(inputs.view(-1, 1, 8, 8), targets, model)


class SelfAttention(nn.Module):
    """Multi-head self-attention from ``nn.Linear`` layers: softmax(QKᵀ/√d)V per head, then a projection."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.projection = nn.Linear(width, width)

    def forward(self, hidden: Tensor) -> Tensor:
        *batch, length, width = hidden.shape
        q, k, v = self.qkv(hidden).view(*batch, length, 3, self.heads, width // self.heads).unbind(-3)
        q, k, v = (x.transpose(-2, -3) for x in (q, k, v))  # [..., heads, length, width / heads]
        weights = torch.softmax(q @ k.transpose(-1, -2) / (width // self.heads) ** 0.5, -1)
        return self.projection((weights @ v).transpose(-2, -3).reshape(*batch, length, width))


class SequenceTransformer(nn.Module):
    """Token and position embeddings, one pre-norm transformer block (self-attention, then an MLP), mean pooling
    and a linear read-out."""

    def __init__(self, vocabulary: int, length: int, classes: int, width: int = 16, heads: int = 2):
        super().__init__()
        self.tokens = nn.Embedding(vocabulary, width)
        self.positions = nn.Parameter(0.1 * torch.randn(length, width))
        self.attention_norm = nn.LayerNorm(width)
        self.attention = SelfAttention(width, heads)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = mlp([width, 2 * width, width], "gelu")
        self.readout = nn.Linear(width, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        hidden = self.tokens(tokens) + self.positions
        hidden = hidden + self.attention(self.attention_norm(hidden))
        hidden = hidden + self.mlp(self.mlp_norm(hidden))
        return self.readout(hidden.mean(-2))


def token_majority_transformer() -> ModuleTaskSpec:
    """Is token A more frequent than token B? Sequences of 16 tokens from a vocabulary of 6, drawn uniformly
    from a fixed seed (ties dropped); a one-layer transformer classifies them."""
    vocabulary, length = 6, 16
    generator = torch.Generator().manual_seed(SEQUENCE_SEED)
    tokens = torch.randint(0, vocabulary, (2 * SEQUENCE_EXAMPLES, length), generator=generator)
    difference = (tokens == 0).sum(1) - (tokens == 1).sum(1)
    tokens, difference = tokens[difference != 0][:SEQUENCE_EXAMPLES], difference[difference != 0][:SEQUENCE_EXAMPLES]
    return _classification(tokens, (difference > 0).long(), lambda: SequenceTransformer(vocabulary, length, 2))


class ElmanRNN(nn.Module):
    """h_t = tanh(W x_t + U h_{t-1} + b) from ``nn.Linear`` layers in a loop; the last state is read out."""

    def __init__(self, features: int, hidden: int, classes: int):
        super().__init__()
        self.hidden = hidden
        self.input = nn.Linear(features, hidden)
        self.recurrent = nn.Linear(hidden, hidden, bias=False)
        self.readout = nn.Linear(hidden, classes)

    def forward(self, sequences: Tensor) -> Tensor:
        state = sequences.new_zeros(*sequences.shape[:-2], self.hidden)
        for step in sequences.unbind(-2):
            state = torch.tanh(self.input(step) + self.recurrent(state))
        return self.readout(state)


def first_versus_last_rnn() -> ModuleTaskSpec:
    """Is the last value of a sequence larger than its first? 12 values from N(0, 1) per sequence, drawn from a
    fixed seed; an Elman RNN (16 hidden units) must carry the first value through the sequence."""
    generator = torch.Generator().manual_seed(SEQUENCE_SEED)
    sequences = torch.randn(SEQUENCE_EXAMPLES, 12, 1, generator=generator)
    targets = (sequences[:, -1, 0] > sequences[:, 0, 0]).long()
    return _classification(sequences, targets, lambda: ElmanRNN(1, 16, 2))
