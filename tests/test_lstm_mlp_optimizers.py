"""The coordinatewise LSTM and MLP learned optimizers: shapes, batching, equivariance, meta-gradients."""

from __future__ import annotations

import json

import pytest
import torch

from jobs.benchmarks.common import off_initialisation
from metaopt.optimizers.base import NetworkOptimizer
from metaopt.optimizers.lstm import CoordinatewiseLSTM
from metaopt.optimizers.mlp import MLPOptimizer
from metaopt.tasks.quadratic import Quadratic

FACTORIES = {"lstm": CoordinatewiseLSTM, "mlp": MLPOptimizer}


@pytest.fixture(params=sorted(FACTORIES))
def optimizer(request) -> NetworkOptimizer:
    return FACTORIES[request.param]()


def run(optimizer: NetworkOptimizer, grads_per_step: list[torch.Tensor], seed: int = 0) -> list[torch.Tensor]:
    """Updates for a fixed sequence of gradients, starting from a fresh state, off the
    initialisation (the LSTM's zero read-out would make every update zero)."""
    meta_params = off_initialisation(optimizer.init_meta_params(seed), 0, scale=0.1)
    state = optimizer.init_state(torch.zeros_like(grads_per_step[0]))
    updates = []
    for step, grads in enumerate(grads_per_step):
        update, state = optimizer.update(meta_params, grads, state, step)
        updates.append(update)
    return updates


def random_grads(*shape: int, steps: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(*shape, generator=generator) for _ in range(steps)]


@pytest.mark.parametrize("shape", [(7,), (3, 7)])
def test_update_and_state_shapes(optimizer, shape):
    params = torch.zeros(shape)
    meta_params = optimizer.init_meta_params(0)
    state = optimizer.init_state(params)
    updates, new_state = optimizer.update(meta_params, torch.randn(shape), state, 0)
    assert updates.shape == params.shape
    assert torch.isfinite(updates).all()
    assert new_state.keys() == state.keys()
    for name, value in state.items():
        assert value.shape[: len(shape)] == params.shape
        assert new_state[name].shape == value.shape


def test_state_shapes_documented():
    params = torch.zeros(4, 6)
    lstm = CoordinatewiseLSTM(hidden=5, layers=3)
    assert {k: v.shape for k, v in lstm.init_state(params).items()} == {"hc": (4, 6, 3, 2, 5)}
    assert all((v == 0).all() for v in lstm.init_state(params).values())
    mlp = MLPOptimizer(decays=(0.9, 0.99))
    assert {k: v.shape for k, v in mlp.init_state(params).items()} == {"momenta": (4, 6, 2), "rms": (4, 6)}


def test_init_meta_params_seeded(optimizer):
    first, again = optimizer.init_meta_params(3), optimizer.init_meta_params(3)
    other = optimizer.init_meta_params(4)
    assert first.keys() == other.keys() == dict(optimizer.network.named_parameters()).keys()
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert any(not torch.equal(first[name], other[name]) for name in first)


def test_batch_equals_rows_alone(optimizer):
    batch = random_grads(4, 9)
    batched = torch.stack(run(optimizer, batch))
    for row in range(4):
        alone = torch.stack(run(optimizer, [grads[row] for grads in batch]))
        torch.testing.assert_close(batched[:, row], alone)


def test_permutation_equivariance(optimizer):
    grads = random_grads(2, 9)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(2))
    plain = run(optimizer, grads)
    permuted = run(optimizer, [g[:, perm] for g in grads])
    for a, b in zip(plain, permuted):
        torch.testing.assert_close(a[:, perm], b)


def test_works_under_no_grad(optimizer):
    grads = random_grads(2, 5)
    with torch.no_grad():
        updates = run(optimizer, grads)
    torch.testing.assert_close(torch.stack(updates), torch.stack(run(optimizer, grads)).detach())
    assert not updates[-1].requires_grad


def meta_gradients(optimizer: NetworkOptimizer, meta_params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta-gradient of the summed losses of a 5-step first-order unroll on 4 quadratics."""
    family = Quadratic(dim=10)
    optimizees = family.sample([0, 1, 2, 3])
    meta_params = {k: v.detach().clone().requires_grad_(True) for k, v in meta_params.items()}
    params = optimizees.params.clone()
    state = optimizer.init_state(params)
    meta_loss = torch.zeros(())
    for step in range(5):
        meta_loss = meta_loss + family.batched_loss(params, optimizees, step).sum()
        leaf = params.detach().requires_grad_(True)
        (grads,) = torch.autograd.grad(family.batched_loss(leaf, optimizees, step).sum(), leaf)
        updates, state = optimizer.update(meta_params, grads, state, step)
        params = params + updates
    meta_loss = meta_loss + family.batched_loss(params, optimizees, 5).sum()
    return dict(zip(meta_params, torch.autograd.grad(meta_loss, list(meta_params.values()))))


def test_every_meta_param_gets_a_meta_gradient(optimizer):
    """From the initialisation the read-out learns (the LSTM's starts at zero and gates the rest);
    after one signed meta-step every meta-parameter gets a finite, non-zero meta-gradient."""
    meta_params = optimizer.init_meta_params(0)
    first = meta_gradients(optimizer, meta_params)
    assert all(first[name].abs().sum() > 0 for name in first if name.startswith("head."))
    stepped = {k: v - 0.01 * first[k].sign() for k, v in meta_params.items()}
    for name, grad in meta_gradients(optimizer, stepped).items():
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name


def test_untrained_lstm_makes_no_update():
    lstm = CoordinatewiseLSTM()
    grads = torch.randn(3, 8)
    updates, _ = lstm.update(lstm.init_meta_params(0), grads, lstm.init_state(grads), 0)
    assert torch.equal(updates, torch.zeros_like(grads))


@pytest.mark.parametrize(
    ("optimizer", "count"),
    [
        (CoordinatewiseLSTM(), 5301),
        (
            CoordinatewiseLSTM(hidden=8, layers=3, preprocess=False),
            4 * 8 * (1 + 8 + 2) + 2 * 4 * 8 * (2 * 8 + 2) + 8 + 1,
        ),
        (MLPOptimizer(), 1474),
        (MLPOptimizer(hidden=16, depth=3, decays=(0.9,)), (4 + 1) * 16 + 2 * 17 * 16 + 2 * 17),
    ],
    ids=["lstm-default", "lstm-custom", "mlp-default", "mlp-custom"],
)
def test_num_meta_params_matches_documented_count(optimizer, count):
    assert optimizer.num_meta_params() == count
    assert sum(v.numel() for v in optimizer.init_meta_params(0).values()) == count


def test_hyperparameters_round_trip(optimizer):
    hyperparameters = json.loads(json.dumps(optimizer.hyperparameters()))
    rebuilt = type(optimizer)(**hyperparameters)
    assert rebuilt.hyperparameters() == optimizer.hyperparameters()
    assert rebuilt.num_meta_params() == optimizer.num_meta_params()


def test_lstm_out_mul_scales_update_linearly():
    grads = random_grads(2, 5)
    base = torch.stack(run(CoordinatewiseLSTM(out_mul=1.0), grads))
    scaled = torch.stack(run(CoordinatewiseLSTM(out_mul=0.25), grads))
    torch.testing.assert_close(scaled, 0.25 * base)


def test_lstm_without_preprocessing_reads_the_raw_gradient():
    lstm = CoordinatewiseLSTM(preprocess=False)
    assert lstm.network.cells[0].input_size == 1
    assert lstm.init_meta_params(0)["cells.0.weight_ih"].shape == (4 * 20, 1)
    assert CoordinatewiseLSTM().network.cells[0].input_size == 2
    assert run(lstm, random_grads(3, 4))[-1].shape == (3, 4)
