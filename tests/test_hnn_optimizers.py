"""Tests for the Hamiltonian learned optimizers: HNNSeed (OPT-ML 2020) and PHNN (port-Hamiltonian)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor

from jobs.benchmarks.common import off_initialisation
from metaopt.optimizers.base import MetaParams, NetworkOptimizer
from metaopt.optimizers.baselines import Momentum
from metaopt.optimizers.hnn_seed import HNNSeed
from metaopt.optimizers.phnn import PHNN
from metaopt.tasks.quadratic import Quadratic

FACTORIES = {
    "hnn_seed": lambda: HNNSeed(),
    "hnn_seed_raw": lambda: HNNSeed(preprocess=False),
    "phnn": lambda: PHNN(),
    "phnn_k3_leapfrog": lambda: PHNN(state_dim=3, state_features=True, integrator="leapfrog"),
}
STATE_DIMS = {"hnn_seed": 2, "hnn_seed_raw": 1, "phnn": 1, "phnn_k3_leapfrog": 3}


def unroll(
    optimizer: NetworkOptimizer, meta_params: MetaParams, steps: int, count: int = 4, meta_loss: bool = False
) -> tuple[Tensor, Tensor]:
    """Optimize ``count`` quadratics for ``steps`` steps; (parameter trajectory [steps, B, n], summed losses)."""
    family = Quadratic(dim=10)
    optimizees = family.sample(range(count))
    params = optimizees.params.clone()
    state = optimizer.init_state(params)
    trajectory, total = [], params.new_zeros(())
    for step in range(steps):
        leaf = params.detach().requires_grad_(True)
        (grads,) = torch.autograd.grad(family.batched_loss(leaf, optimizees, step).sum(), leaf)
        updates, state = optimizer.update(meta_params, grads, state, step)
        params = params + updates if meta_loss else (params + updates).detach()
        trajectory.append(params.detach())
        if meta_loss:
            total = total + family.batched_loss(params, optimizees, step + 1).sum()
    return torch.stack(trajectory), total


def meta_gradients(optimizer: NetworkOptimizer, meta_params: MetaParams, steps: int = 5) -> dict[str, Tensor]:
    """Meta-gradient of the summed losses of a short first-order unroll on 4 quadratics."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in meta_params.items()}
    _, total = unroll(optimizer, leaves, steps, meta_loss=True)
    return dict(zip(leaves, torch.autograd.grad(total, list(leaves.values()))))


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize("shape", [(7,), (3, 5)])
def test_shapes(name: str, shape: tuple[int, ...]):
    optimizer = FACTORIES[name]()
    meta_params = optimizer.init_meta_params(0)
    state = optimizer.init_state(torch.zeros(shape))
    assert {k: v.shape for k, v in state.items()} == {"p": torch.Size(shape + (STATE_DIMS[name],))}
    assert all((v == 0).all() for v in state.values())
    updates, state = optimizer.update(meta_params, torch.randn(shape), state, 0)
    assert updates.shape == torch.Size(shape)
    assert state["p"].shape == torch.Size(shape + (STATE_DIMS[name],))
    assert torch.isfinite(updates).all()
    json.dumps(optimizer.spec())


@pytest.mark.parametrize("name", FACTORIES)
def test_init_meta_params_seeded(name: str):
    optimizer = FACTORIES[name]()
    a, b, c = (optimizer.init_meta_params(s) for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("name", FACTORIES)
def test_coordinatewise(name: str):
    optimizer = FACTORIES[name]()
    meta_params = off_initialisation(optimizer.init_meta_params(0), 0, scale=0.1)
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, 6, generator=generator) for _ in range(3)]
    perm = torch.randperm(6, generator=generator)
    batch_state, perm_state = optimizer.init_state(grads[0]), optimizer.init_state(grads[0][:, perm])
    row_states = [optimizer.init_state(grads[0][i]) for i in range(3)]
    for step, g in enumerate(grads):
        updates, batch_state = optimizer.update(meta_params, g, batch_state, step)
        perm_updates, perm_state = optimizer.update(meta_params, g[:, perm], perm_state, step)
        torch.testing.assert_close(perm_updates, updates[:, perm])
        for i in range(3):
            row_updates, row_states[i] = optimizer.update(meta_params, g[i], row_states[i], step)
            torch.testing.assert_close(row_updates, updates[i])


@pytest.mark.parametrize("name", FACTORIES)
def test_no_grad_matches_grad_mode(name: str):
    optimizer = FACTORIES[name]()
    meta_params = {
        k: v.requires_grad_(True) for k, v in off_initialisation(optimizer.init_meta_params(0), 0, scale=0.1).items()
    }
    grads = torch.randn(4, 10)
    state = optimizer.init_state(grads)
    with_grad, next_state = optimizer.update(meta_params, grads, state, 0)
    assert with_grad.requires_grad
    with torch.no_grad():
        without_grad, _ = optimizer.update(meta_params, grads, state, 0)
        again, _ = optimizer.update(meta_params, grads, {k: v.detach() for k, v in next_state.items()}, 1)
    assert not without_grad.requires_grad
    torch.testing.assert_close(without_grad, with_grad.detach())
    assert torch.isfinite(again).all()


def assert_all_meta_gradients(grads: dict[str, Tensor]):
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name


@pytest.mark.parametrize("preprocess", [True, False])
def test_hnn_seed_every_meta_param_gets_meta_gradient(preprocess: bool):
    """The zero read-out W_out learns from the start and gates the rest; after one signed meta-step
    every meta-parameter (G, M and the state read-out too, which the original never trained) learns."""
    optimizer = HNNSeed(preprocess=preprocess)
    meta_params = optimizer.init_meta_params(0)
    first = meta_gradients(optimizer, meta_params)
    assert_all_meta_gradients({k: v for k, v in first.items() if k.startswith("W_out.")})
    stepped = {k: v - 0.01 * first[k].sign() for k, v in meta_params.items()}
    assert_all_meta_gradients(meta_gradients(optimizer, stepped))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"state_dim": 2, "state_features": True},
        {"integrator": "leapfrog"},
        {"normalize": True},
        {"sign_equivariant": True, "state_dim": 2, "state_features": True},
        {"horizon": 40},
    ],
)
def test_phnn_every_meta_param_gets_meta_gradient(options: dict):
    optimizer = PHNN(**options)
    meta_params = optimizer.init_meta_params(0)
    grads = meta_gradients(optimizer, meta_params)
    # At initialisation the zero last layers gate their MLPs' hidden layers (exactly zero gradient);
    # everything else already learns, and one meta-step opens the hidden layers too.
    gated = {k for k in grads if k.split(".")[0] in ("hamiltonian", "dissipation", "port") and ".0." in k}
    assert gated
    assert_all_meta_gradients({k: v for k, v in grads.items() if k not in gated})
    assert all((grads[k] == 0).all() for k in gated)
    stepped = {k: v - 1e-2 * torch.sign(grads[k]) for k, v in meta_params.items()}
    assert_all_meta_gradients(meta_gradients(optimizer, stepped))


def test_phnn_learned_hamiltonian_double_backward():
    """∂H/∂p comes from torch.func.grad; the meta-gradient through it must be the true derivative."""
    optimizer = PHNN(hidden=4)
    meta_params = {k: v.double() for k, v in off_initialisation(optimizer.init_meta_params(0), 0, scale=0.1).items()}
    grads = torch.randn(5, dtype=torch.float64)
    state = {"p": torch.randn(5, 1, dtype=torch.float64)}

    def step(weight: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
        updates, new_state = optimizer.update({**meta_params, "hamiltonian.0.weight": weight}, grads, {"p": p}, 0)
        return updates, new_state["p"]

    weight = meta_params["hamiltonian.0.weight"].clone().requires_grad_(True)
    p = state["p"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(step, (weight, p))


def test_phnn_schedule_starts_as_bias_corrected_heavy_ball_decaying_over_the_second_half():
    """At initialisation Δθ = −lr·s(t/T)·buf / (1 − μ^(t+1)), s = 1 to T/2, then linear to 0 at T."""
    lr, momentum, horizon = 0.01, 0.8, 24
    optimizer = PHNN(init_lr=lr, init_momentum=momentum, horizon=horizon)
    phnn, _ = unroll(optimizer, optimizer.init_meta_params(0), steps=30)
    family = Quadratic(dim=10)
    optimizees = family.sample(range(4))
    params, buf, expected = optimizees.params.clone(), torch.zeros_like(optimizees.params), []
    for step in range(30):
        leaf = params.detach().requires_grad_(True)
        (grads,) = torch.autograd.grad(family.batched_loss(leaf, optimizees, step).sum(), leaf)
        buf = momentum * buf + grads
        level = max(0.0, min(1.0, 2 * (1 - step / horizon)))
        params = params - lr * level * buf / (1 - momentum ** (step + 1))
        expected.append(params.detach())
    torch.testing.assert_close(phnn, torch.stack(expected), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(phnn[-1], phnn[horizon - 1])  # no steps after the horizon


def test_phnn_schedule_scales_each_step_by_its_interpolated_knot():
    """σ(t) = s(t/T) / (1 − μ₀^(t+1)) multiplies the step Δθ and leaves p alone."""
    plain = PHNN(normalize=True, sign_equivariant=True, init_momentum=0.7)
    scheduled = PHNN(normalize=True, sign_equivariant=True, init_momentum=0.7, horizon=80)
    meta_params = off_initialisation(plain.init_meta_params(0), 0, scale=0.3)
    knots = torch.tensor([0.2, 0.6, 1.4, 1.0, -0.5, 0.8, 0.3, 0.1, 0.05])
    grads = torch.randn(6, generator=torch.Generator().manual_seed(0))
    state = plain.init_state(grads)
    # t -> s(t / 80): knots sit every 10 steps; a negative knot counts as 0; after T the last holds
    for step, level in (
        (0, 0.2),
        (5, 0.4),
        (25, 1.2),
        (33, 0.7 * 1.0 + 0.3 * -0.5),
        (40, 0.0),
        (79, 0.05 + 0.1 * 0.05),
        (80, 0.05),
        (200, 0.05),
    ):
        expected, expected_state = plain.update(meta_params, grads, state, step)
        updates, new_state = scheduled.update({**meta_params, "schedule": knots}, grads, state, step)
        factor = max(level, 0.0) / (1 - 0.7 ** (step + 1))
        torch.testing.assert_close(updates, factor * expected)
        torch.testing.assert_close(new_state, expected_state)
        state = new_state
    with pytest.raises(ValueError, match="needs init_momentum < 1"):
        PHNN(init_momentum=1.0, horizon=100)
    with pytest.raises(ValueError, match="must be >= 1"):
        PHNN(horizon=0)


@pytest.mark.parametrize(
    ("optimizer", "count"),
    [
        (HNNSeed(), 59),
        (HNNSeed(preprocess=False), 19),
        (PHNN(), 229),
        (PHNN(hamiltonian="quadratic", dissipation="constant", port="identity"), 2),
        (PHNN(state_dim=3, hidden=8, state_features=True), 1 + 9 + 7 * 8 + (6 * 8 + 8 * 9 + 9) + (6 * 8 + 48 + 6) + 3),
        (PHNN(depth=2, activation="gelu"), 229 + 3 * (16 * 16 + 16)),
        (PHNN(preprocess=False), 229 - 3 * 16),
        (PHNN(sign_equivariant=True), 229 - 3 * 16),
        (PHNN(sign_equivariant=True, horizon=100), 229 - 3 * 16 + 9),
        (HNNSeed(hidden=8, depth=2, activation="silu"), 2 * (2 * 2 * 8 + 8 + 2 + (8 * 8 + 8)) + 7 * 4 + 3 * 2 + 1),
    ],
)
def test_num_meta_params(optimizer: NetworkOptimizer, count: int):
    assert optimizer.num_meta_params() == count
    assert sum(v.numel() for v in optimizer.init_meta_params(0).values()) == count


@pytest.mark.parametrize(
    "options",
    [
        {"hamiltonian": "quadratic", "dissipation": "constant", "port": "identity"},
        {},
        {"state_dim": 2, "state_features": True},
        {"sign_equivariant": True},
    ],
)
@pytest.mark.parametrize(("lr", "momentum"), [(0.01, 0.9), (0.005, 0.8)])
def test_phnn_starts_as_heavy_ball(options: dict, lr: float, momentum: float):
    optimizer = PHNN(init_lr=lr, init_momentum=momentum, **options)
    phnn, _ = unroll(optimizer, optimizer.init_meta_params(0), steps=50)
    heavy_ball, _ = unroll(Momentum(lr, momentum), {}, steps=50)
    torch.testing.assert_close(phnn, heavy_ball, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"preprocess": False},
        {"state_dim": 2, "state_features": True},
        {"integrator": "leapfrog", "normalize": True},
    ],
)
def test_phnn_sign_equivariant_flips_with_the_gradient(options: dict):
    """(g, p) -> (−g, −p) gives exactly (−Δθ, −p'), so a zero gradient on a zero state moves nothing;
    the same weights without the option push such coordinates one way."""
    optimizer = PHNN(sign_equivariant=True, **options)
    meta_params = off_initialisation(optimizer.init_meta_params(0), 0, scale=0.3)
    grads = torch.randn(4, 6)
    state = {key: torch.randn_like(value) for key, value in optimizer.init_state(grads).items()}
    if "v" in state:
        state["v"] = state["v"].abs()
    updates, next_state = optimizer.update(meta_params, grads, state, 3)
    flipped, flipped_state = optimizer.update(meta_params, -grads, {**state, "p": -state["p"]}, 3)
    assert updates.abs().min() > 0
    torch.testing.assert_close(flipped, -updates, rtol=0, atol=0)
    torch.testing.assert_close(flipped_state["p"], -next_state["p"], rtol=0, atol=0)

    zeros = torch.zeros(8)
    still, _ = optimizer.update(meta_params, zeros, optimizer.init_state(zeros), 0)
    assert (still == 0).all()
    plain = PHNN(**options)
    drift, _ = plain.update(
        off_initialisation(plain.init_meta_params(0), 0, scale=0.3), zeros, plain.init_state(zeros), 0
    )
    assert drift.abs().min() > 1e-4


def test_phnn_sign_equivariant_state_feature_tells_agreeing_momentum_from_opposing():
    """Under sign equivariance the state feature is p·sign g, invariant to (g, p) -> (−g, −p), yet
    it tells a momentum that opposes the gradient from one that agrees (|p| could not)."""
    # Only the dissipation is learned: p' = p + h·(−g − a(x)²·p). Were a the same for p and −p, as
    # with |p|, the two next states would sum to exactly −2hg.
    optimizer = PHNN(sign_equivariant=True, state_features=True, hamiltonian="quadratic", port="identity")
    meta_params = off_initialisation(optimizer.init_meta_params(0), 0, scale=0.3)
    grads, p = torch.rand(50) + 0.1, torch.rand(50, 1) + 0.1
    _, agreeing = optimizer.update(meta_params, grads, {"p": p}, 0)
    _, opposing = optimizer.update(meta_params, grads, {"p": -p}, 0)
    h = float(meta_params["log_h"].exp())
    assert ((agreeing["p"] + opposing["p"])[:, 0] + 2 * h * grads).abs().min() > 1e-4
    _, flipped = optimizer.update(meta_params, -grads, {"p": -p}, 0)
    torch.testing.assert_close(flipped["p"], -agreeing["p"], rtol=0, atol=0)


def test_phnn_normalize_starts_as_heavy_ball_on_rms_normalised_gradients():
    optimizer = PHNN(normalize=True, rms_decay=0.99)
    meta_params = optimizer.init_meta_params(0)
    grads = [torch.randn(3, 5) * scale for scale in (1e-3, 1.0, 10.0)]
    state, momentum = optimizer.init_state(grads[0]), Momentum(0.01, 0.9)
    momentum_state, v = momentum.init_state(grads[0]), torch.zeros(3, 5)
    for step, g in enumerate(grads):
        updates, state = optimizer.update(meta_params, g, state, step)
        v = 0.99 * v + 0.01 * g * g
        expected, momentum_state = momentum.update(
            {}, g / ((v / (1 - 0.99 ** (step + 1))).sqrt() + 1e-8), momentum_state, step
        )
        torch.testing.assert_close(updates, expected)
    # Scale-free: the same gradients 1000× larger give the same steps.
    scaled, _ = optimizer.update(meta_params, 1e3 * grads[1], optimizer.init_state(grads[1]), 0)
    first, _ = optimizer.update(meta_params, grads[1], optimizer.init_state(grads[1]), 0)
    torch.testing.assert_close(scaled, first)


def test_phnn_leapfrog_differs_from_semi_implicit_euler():
    euler = PHNN()
    leapfrog = PHNN(integrator="leapfrog")
    meta_params = euler.init_meta_params(0)
    euler_trajectory, _ = unroll(euler, meta_params, steps=10)
    leapfrog_trajectory, _ = unroll(leapfrog, meta_params, steps=10)
    assert torch.isfinite(leapfrog_trajectory).all()
    assert not torch.allclose(euler_trajectory, leapfrog_trajectory)


def test_phnn_rejects_unknown_switch():
    with pytest.raises(ValueError):
        PHNN(integrator="rk4")


@pytest.mark.parametrize(
    "options", [{"depth": 3, "activation": "relu"}, {"preprocess": False}, {"integrator": "leapfrog"}]
)
def test_phnn_architectures_start_as_heavy_ball(options):
    """Every architecture of the search space starts as heavy ball (zero last layers)."""
    grads = torch.randn(3, 5)
    searched, plain = PHNN(**options), PHNN(hamiltonian="quadratic", dissipation="constant", port="identity")
    if options.get("integrator"):
        plain = PHNN(hamiltonian="quadratic", dissipation="constant", port="identity", integrator="leapfrog")
    updates, _ = searched.update(searched.init_meta_params(0), grads, searched.init_state(grads), 0)
    expected, _ = plain.update(plain.init_meta_params(0), grads, plain.init_state(grads), 0)
    torch.testing.assert_close(updates, expected)


def test_architecture_options_are_checked():
    with pytest.raises(ValueError, match="activation must be one of"):
        PHNN(activation="softmax")
    with pytest.raises(ValueError, match="depth must be >= 1"):
        HNNSeed(depth=0)
