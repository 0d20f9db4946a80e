"""The optimizer shipped in the package: ``load_optimizer("pretrained:general", params)``."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import metaopt
from metaopt.meta import CheckpointError
from metaopt.tracking.registry import PRETRAINED


def regression(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=generator)
    y = x @ torch.randn(8, 1, generator=generator) + 0.1 * torch.randn(256, 1, generator=generator)
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)), x, y


def train(model, optimizer, x, y, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_it_loads_without_a_server_and_trains_a_model(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens: any request would fail
    model, x, y = regression()
    losses = train(model, metaopt.load_optimizer("pretrained:general", model.parameters(), horizon=100), x, y, 100)
    assert losses[-1] < 0.2 * losses[0]


def test_its_state_dict_round_trips_bit_exactly():
    model, x, y = regression()
    optimizer = metaopt.load_optimizer("pretrained:general", model.parameters(), horizon=40)
    train(model, optimizer, x, y, 10)
    twin = copy.deepcopy(model)
    restored = metaopt.load_optimizer("pretrained:general", twin.parameters(), horizon=40)
    restored.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    train(model, optimizer, x, y, 10)
    train(twin, restored, x, y, 10)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_horizon_stretches_its_learned_schedule():
    runs = {}
    for horizon in (20, 200):
        model, x, y = regression()
        optimizer = metaopt.load_optimizer("pretrained:general", model.parameters(), horizon=horizon)
        train(model, optimizer, x, y, 19)
        before = [p.detach().clone() for p in model.parameters()]
        train(model, optimizer, x, y, 1)  # step 20: the end of the short run's schedule, early in the long one's
        runs[horizon] = sum(float((p.detach() - b).norm()) for p, b in zip(model.parameters(), before))
    assert runs[20] < 0.5 * runs[200]


def test_its_spec_records_the_mixture_estimator_and_budget_it_came_from():
    spec = json.loads((PRETRAINED / "general" / "spec.json").read_text())
    train_section = spec["train"]
    assert {entry["task"]["kind"] for entry in train_section["tasks"]} >= {"image_mlp", "markov_transformer", "char_lm"}
    assert train_section["estimator"]["kind"] == "pes" and train_section["meta_steps"] >= spec["meta_step"] > 0
    assert spec["kind"] == "phnn" and spec["hyperparameters"]["horizon"] == train_section["episode_length"]


def test_an_unknown_name_lists_the_shipped_ones():
    with pytest.raises(CheckpointError, match="no such pretrained optimizer; shipped: general"):
        metaopt.load_optimizer("pretrained:nope", [torch.zeros(1, requires_grad=True)])
