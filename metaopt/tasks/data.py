"""MNIST loading with torchvision: downloaded where there is internet, read from a root otherwise."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

DataSplit = Literal["train", "test"]
_FILE_PREFIX = {"train": "train", "test": "t10k"}
# The fixed, seeded 50/50 meta-train / meta-test partition of the OPT-ML and L2L experiments.
META_SPLIT_SEED = 10


class DataNotFoundError(FileNotFoundError):
    """The configured data root does not hold the requested data, and it could not be downloaded."""


def _raw_files(root: Path, split: DataSplit) -> tuple[Path, Path]:
    raw = root / "MNIST" / "raw"
    prefix = _FILE_PREFIX[split]
    return raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"


@functools.lru_cache(maxsize=4)
def load_mnist(root: str, split: DataSplit = "train", download: bool = False) -> tuple[Tensor, Tensor]:
    """MNIST ``split`` as (images uint8 [N, 28, 28], labels int64 [N]) from ``root``/MNIST/raw.

    Reads torchvision's raw files directly, so the test split alone is enough for ``split="test"``
    (``torchvision.datasets.MNIST`` insists on both splits). Downloads with torchvision when the
    files are missing and ``download`` is set.
    """
    from torchvision.datasets import MNIST
    from torchvision.datasets.mnist import read_image_file, read_label_file

    root_path = Path(root).expanduser()
    images_file, labels_file = _raw_files(root_path, split)
    if not (images_file.exists() and labels_file.exists()):
        hint = (
            f"MNIST {split} split not found: expected {images_file} and {labels_file} "
            f"(torchvision's layout) under data root {root_path.resolve()}. "
        )
        if not download:
            raise DataNotFoundError(
                hint + "Set task.data.download: true to download it, point task.data.root at a folder "
                "that holds MNIST/raw/, or use task.data.split: test where only the test split exists."
            )
        try:
            MNIST(str(root_path), train=split == "train", download=True)
        except Exception as error:  # torchvision raises RuntimeError/URLError/OSError variously
            raise DataNotFoundError(
                hint + f"Downloading it failed ({error}). Copy the MNIST raw files there, or "
                "point task.data.root at a folder that holds them."
            ) from error
    return read_image_file(str(images_file)), read_label_file(str(labels_file)).long()


def meta_split_indices(num_examples: int, half: Literal["meta_train", "meta_test"]) -> np.ndarray:
    """The fixed 50/50 split of example indices into a meta-train and a meta-test half."""
    order = np.arange(num_examples)
    np.random.RandomState(META_SPLIT_SEED).shuffle(order)
    middle = num_examples // 2
    return order[:middle] if half == "meta_train" else order[middle:]


def mnist_half(
    root: str, split: DataSplit, download: bool, half: Literal["meta_train", "meta_test"]
) -> tuple[Tensor, Tensor]:
    """One meta-split half of MNIST as float pixels in [0, 1] flattened to [N, 784] and labels [N]."""
    images, labels = load_mnist(root, split, download)
    index = torch.from_numpy(meta_split_indices(len(labels), half))
    pixels = images[index].reshape(len(index), -1).float().div_(255.0)
    return pixels, labels[index]
