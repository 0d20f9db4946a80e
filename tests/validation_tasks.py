"""Small task factories with held-out validation data for the validation benchmark's tests
(``validation_tasks:digits_mlp``): scikit-learn's bundled digits, a seeded split into disjoint training and
validation examples, accuracy as the metric."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metaopt.tasks import ModuleTaskSpec

TRAIN, VALIDATION = 384, 192  # examples of each: small, so a test run takes seconds


def _digits() -> tuple[Tensor, Tensor]:
    """Digits as standardised 64-pixel features, in a seeded random order."""
    from sklearn.datasets import load_digits

    data = load_digits()
    features = torch.as_tensor(data.data, dtype=torch.float32)
    features = (features - features.mean(0)) / features.std(0).clamp_min(1e-8)
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(0))
    return features[order], torch.as_tensor(data.target, dtype=torch.int64)[order]


def accuracy(outputs: Tensor, targets: Tensor) -> Tensor:
    return (outputs.argmax(-1) == targets).float().mean()


def _split(inputs: Tensor, targets: Tensor, model) -> ModuleTaskSpec:
    return ModuleTaskSpec(
        model=model,
        inputs=inputs[:TRAIN],
        targets=targets[:TRAIN],
        loss=nn.functional.cross_entropy,
        validation_inputs=inputs[TRAIN : TRAIN + VALIDATION],
        validation_targets=targets[TRAIN : TRAIN + VALIDATION],
        metric=accuracy,
    )


def digits_mlp() -> ModuleTaskSpec:
    """An MLP 64 → 32 → 10 (ReLU)."""
    inputs, targets = _digits()
    return _split(inputs, targets, lambda: nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)))


def digits_bn_cnn() -> ModuleTaskSpec:
    """A tiny CNN with BatchNorm on 1×8×8 digit images."""
    inputs, targets = _digits()

    def model() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64, 10),
        )

    return _split(inputs.view(-1, 1, 8, 8), targets, model)


def digits_without_validation() -> ModuleTaskSpec:
    """The MLP task with its validation data left out."""
    spec = digits_mlp()
    spec.validation_inputs = spec.validation_targets = spec.metric = None
    return spec
