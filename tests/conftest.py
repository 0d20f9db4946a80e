"""Shared fixtures: the real MNIST test split shipped beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mnist_root() -> str:
    """``$METAOPT_MNIST_ROOT`` or ``../shared/datasets``: a folder holding MNIST/raw/ (test split)."""
    root = Path(os.environ.get("METAOPT_MNIST_ROOT", REPO_ROOT.parent / "shared" / "datasets"))
    if not (root / "MNIST" / "raw" / "t10k-images-idx3-ubyte").exists():
        pytest.fail(f"MNIST test split not found under {root}; set METAOPT_MNIST_ROOT to a folder holding MNIST/raw/")
    return str(root)


@pytest.fixture
def mnist_task(mnist_root):
    """A task config section for the MNIST MLP on the shipped test split."""
    return {
        "kind": "mnist_mlp",
        "hidden_sizes": [20],
        "data": {"root": mnist_root, "split": "test", "download": False},
    }
