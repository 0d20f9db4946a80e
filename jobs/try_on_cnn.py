"""A registered optimizer on a model it never saw: a small CNN on MNIST, beside Adam.

    uv run python jobs/try_on_cnn.py --optimizer models:/mnist-phnn@latest
        [--data-root data --split train] [--steps 300] [--output runs/bench/cnn.json]

Trains the same CNN (same initialisation, same minibatches) with the learned optimizer (loaded
through ``metaopt.load_optimizer``) and with Adam at several learning rates; prints a table of the
mean training loss over the last 20 steps and the test-half accuracy, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

import metaopt
from metaopt.tasks.data import mnist_half


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),
        nn.Conv2d(1, 8, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 10),
    )


def train(name: str, make_optimizer, data, steps: int, batch_size: int) -> dict:
    (x, y), (x_test, y_test) = data
    model = cnn()
    optimizer = make_optimizer(model.parameters())
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in tqdm(range(steps), desc=name, leave=False):
        index = torch.randint(len(y), (batch_size,), generator=generator)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x[index]), y[index])
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    tail = losses[-20:]
    return {
        "optimizer": name,
        "final_train_loss": sum(tail) / len(tail),
        "test_accuracy": accuracy,
        "first_loss": losses[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--optimizer", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/..., or a folder"
    )
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--split", default="train", choices=["train", "test"])
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--adam-lrs", type=float, nargs="+", default=[0.0003, 0.001, 0.003, 0.01])
    parser.add_argument("--output", default="runs/bench/cnn.json")
    args = parser.parse_args()

    train_half = mnist_half(args.data_root, args.split, args.download, "meta_train")
    test_half = mnist_half(args.data_root, args.split, args.download, "meta_test")
    data = (train_half, test_half)
    rows = [
        train(
            f"learned ({args.optimizer})",
            lambda p: metaopt.load_optimizer(args.optimizer, p, tracking_uri=args.tracking_uri),
            data,
            args.steps,
            args.batch_size,
        )
    ]
    for lr in args.adam_lrs:
        rows.append(
            train(f"adam ({lr:g})", lambda p, lr=lr: torch.optim.Adam(p, lr=lr), data, args.steps, args.batch_size)
        )
    print(
        f"small CNN on MNIST ({args.split} split, {len(train_half[1])} training images), batch "
        f"{args.batch_size}, {args.steps} steps; train loss = mean of the last 20 steps"
    )
    print("\n| optimizer | train loss | test-half accuracy |\n|---|---|---|")
    for row in rows:
        print(f"| {row['optimizer']} | {row['final_train_loss']:.4f} | {row['test_accuracy']:.3f} |")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
