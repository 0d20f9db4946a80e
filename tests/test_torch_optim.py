"""LearnedOptimizer: a metaopt optimizer stepping a real torch model like any torch.optim optimizer."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from jobs.benchmarks.common import off_initialisation
from metaopt.optimizers import make_optimizer
from metaopt.optimizers.torch_optim import LearnedOptimizer


def model_and_data(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    return model, x, y


def train(model, optimizer, x, y, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def phnn_optimizer(params, lr: float = 1.0, **options):
    phnn = make_optimizer("phnn", init_lr=0.1, init_momentum=0.9, **options)
    return LearnedOptimizer(params, phnn, phnn.init_meta_params(0), lr=lr)


def test_untrained_phnn_steps_a_model_exactly_like_torch_sgd_with_momentum():
    model, x, y = model_and_data()
    reference = copy.deepcopy(model)
    learned_losses = train(model, phnn_optimizer(model.parameters()), x, y, steps=30)
    sgd_losses = train(reference, torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9), x, y, steps=30)
    torch.testing.assert_close(learned_losses, sgd_losses, rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert learned_losses[-1] < 0.85 * learned_losses[0]


@pytest.mark.parametrize("options", [{}, {"normalize": True}])  # normalize: its RMS state and bias correction
def test_state_dict_round_trip_resumes_exactly(options):
    model, x, y = model_and_data()
    straight = copy.deepcopy(model)
    optimizer = phnn_optimizer(model.parameters(), **options)
    train(model, optimizer, x, y, steps=5)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed_model, _, _ = model_and_data(seed=1)  # different weights, overwritten by the checkpoint
    resumed_model.load_state_dict(saved["model"])
    resumed = phnn_optimizer(resumed_model.parameters(), **options)
    resumed.load_state_dict(saved["optimizer"])
    resumed_losses = train(resumed_model, resumed, x, y, steps=5)

    straight_losses = train(straight, phnn_optimizer(straight.parameters(), **options), x, y, steps=10)[5:]
    assert resumed_losses == straight_losses
    assert all(("v" in s) == bool(options) for s in resumed.state_dict()["state"].values())
    assert all(int(s["step"]) == 10 for s in resumed.state_dict()["state"].values())


def test_a_state_dict_of_another_optimizer_is_refused_with_the_state_it_needs():
    model, x, y = model_and_data()
    lstm = make_optimizer("lstm")
    optimizer = LearnedOptimizer(model.parameters(), lstm, off_initialisation(lstm.init_meta_params(0), 0, scale=0.3))
    train(model, optimizer, x, y, steps=2)
    saved = optimizer.state_dict()
    assert all(set(state) == {"hc", "step"} for state in saved["state"].values())
    older = copy.deepcopy(saved)  # lstm's state before h and c became one tensor
    for state in older["state"].values():
        hc = state.pop("hc")
        state["h"], state["c"] = hc[..., 0, :], hc[..., 1, :]
    with pytest.raises(
        ValueError,
        match=r"holds state \['c', 'h'\] for parameter 0, but a 'lstm' "
        r"LearnedOptimizer keeps \['hc'\]",
    ):
        optimizer.load_state_dict(older)
    adam = torch.optim.Adam(model.parameters())
    train(model, adam, x, y, steps=1)
    with pytest.raises(ValueError, match=r"holds state \['exp_avg', 'exp_avg_sq'\]"):
        optimizer.load_state_dict(adam.state_dict())
    optimizer.load_state_dict(saved)  # its own still loads
    train(model, optimizer, x, y, steps=1)


def test_param_groups_scale_updates_by_their_lr():
    model, x, y = model_and_data()
    first, second = model[0], model[2]
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = phnn_optimizer([{"params": first.parameters()}, {"params": second.parameters(), "lr": 0.5}])
    train(model, optimizer, x, y, steps=1)
    reference, _, _ = model_and_data()
    train(reference, phnn_optimizer(reference.parameters()), x, y, steps=1)
    for p, q, b in zip(first.parameters(), reference[0].parameters(), before[:2]):
        torch.testing.assert_close(p - b, q - b)
    for p, q, b in zip(second.parameters(), reference[2].parameters(), before[2:]):
        torch.testing.assert_close(p - b, 0.5 * (q - b))


def test_a_scheduler_drives_the_lr_multiplier():
    model, x, y = model_and_data()
    optimizer = phnn_optimizer(model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    train(model, optimizer, x, y, steps=1)
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("kind", ["lstm", "hnn_seed", "mlp"])
def test_every_learned_kind_steps_a_model(kind):
    model, x, y = model_and_data()
    learned = make_optimizer(kind)
    # Off the initialisation: lstm and hnn_seed start with a zero read-out (no update).
    meta_params = off_initialisation(learned.init_meta_params(0), 0, scale=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    train(model, LearnedOptimizer(model.parameters(), learned, meta_params), x, y, steps=3)
    assert all(torch.isfinite(p).all() and not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_horizon_stretches_the_learned_schedule_and_warns_past_it():
    model, x, y = model_and_data()
    stretched = copy.deepcopy(model)
    short = make_optimizer("phnn", init_lr=0.1, init_momentum=0.9, horizon=10)
    long = make_optimizer("phnn", init_lr=0.1, init_momentum=0.9, horizon=40)
    train(model, LearnedOptimizer(model.parameters(), long, long.init_meta_params(0)), x, y, steps=40)
    loaded = LearnedOptimizer(stretched.parameters(), short, short.init_meta_params(0), horizon=40)
    train(stretched, loaded, x, y, steps=40)
    for p, q in zip(model.parameters(), stretched.parameters()):
        torch.testing.assert_close(p, q)
    with pytest.warns(UserWarning, match="passes the phnn optimizer's horizon of 40 steps"):
        train(stretched, loaded, x, y, steps=1)
    plain = make_optimizer("phnn")
    with pytest.raises(ValueError, match="has no learned step schedule"):
        LearnedOptimizer(model.parameters(), plain, plain.init_meta_params(0), horizon=40)


def test_bad_lr_is_rejected():
    model, _, _ = model_and_data()
    with pytest.raises(ValueError, match="lr must be > 0"):
        phnn_optimizer(model.parameters(), lr=0.0)


# phnn with the two step-dependent parts (normalize's bias correction, the horizon's schedule); the other kinds
# keep no step-dependent state, so a shared count must still leave their per-parameter state in place.
STEP_COUNTED = {"phnn": {"init_lr": 0.1, "normalize": True, "horizon": 100}, "hnn_seed": {}, "lstm": {}, "mlp": {}}


@pytest.mark.parametrize("fused", [None, False], ids=["fused", "batched"])
@pytest.mark.parametrize("kind", list(STEP_COUNTED))
def test_a_parameter_that_skips_steps_leaves_the_others_step_counts_alone(kind, fused):
    """``a`` (listed first) has no gradient for 50 steps: a frozen or unused layer. Every parameter must
    still be stepped exactly as its own optimizer would step it, by its own step count."""
    learned = make_optimizer(kind, **STEP_COUNTED[kind])
    meta_params = off_initialisation(learned.init_meta_params(0), 0, scale=0.1)
    generator = torch.Generator().manual_seed(0)
    grads = [(torch.randn(3, 4, generator=generator), torch.randn(5, generator=generator)) for _ in range(60)]
    a, b = torch.randn(3, 4, generator=generator), torch.randn(5, generator=generator)
    together = [a.clone().requires_grad_(), b.clone().requires_grad_()]
    alone = [a.clone().requires_grad_(), b.clone().requires_grad_()]
    shared = LearnedOptimizer(together, learned, meta_params, fused=fused)
    own = [LearnedOptimizer([p], learned, meta_params, fused=fused) for p in alone]
    for step, (grad_a, grad_b) in enumerate(grads):
        together[0].grad = grad_a.clone() if step >= 50 else None
        together[1].grad = grad_b.clone()
        shared.step()
        if step >= 50:
            alone[0].grad = grad_a.clone()
            own[0].step()
        alone[1].grad = grad_b.clone()
        own[1].step()
    assert [int(shared.state[p]["step"]) for p in together] == [10, 60]
    for p, q in zip(together, alone):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    for key in shared.state[together[1]]:
        torch.testing.assert_close(shared.state[together[1]][key], own[1].state[alone[1]][key], rtol=1e-6, atol=1e-7)


GENERAL = {"normalize": True, "sign_equivariant": True, "horizon": 20, "init_lr": 0.02, "init_momentum": 0.6}


@pytest.mark.parametrize(
    ("kind", "options", "fused"),
    [("phnn", GENERAL, True), ("phnn", GENERAL, False), ("hnn_seed", {}, True), ("lstm", {}, True)],
    ids=["phnn-fused", "phnn-batched", "hnn_seed-fused", "lstm-fused"],
)
def test_a_compiled_optimizer_step_has_no_graph_break_and_equals_the_eager_one(kind, options, fused):
    """torch.compile(optimizer.step, fullgraph=True): the fused step's op and the step counts (tensors)
    trace; the compiled steps equal the eager ones and the growing step count never recompiles."""
    optimizer = make_optimizer(kind, **options)
    meta_params = off_initialisation(optimizer.init_meta_params(0), 0, scale=0.1)
    model, x, y = model_and_data()
    models = [model, copy.deepcopy(model)]
    optimizers = [LearnedOptimizer(m.parameters(), optimizer, meta_params, fused=fused) for m in models]
    compiled = torch.compile(optimizers[1].step, fullgraph=True)
    for step in range(5):
        for index, (m, opt) in enumerate(zip(models, optimizers)):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            if index == 0 or step == 0:  # the first step builds the state, eagerly
                opt.step()
            else:
                with torch._dynamo.config.patch(error_on_recompile=step > 1):
                    compiled()
    for eager, traced in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-6)
    assert not torch.equal(next(models[0].parameters()), next(model_and_data()[0].parameters()))


@pytest.mark.parametrize(
    ("kind", "options", "fused"),
    [("phnn", GENERAL, True), ("phnn", GENERAL, False), ("hnn_seed", {}, True), ("lstm", {}, True)],
    ids=["phnn-fused", "phnn-batched", "hnn_seed-fused", "lstm-fused"],
)
def test_a_compiled_training_step_equals_the_eager_one(kind, options, fused):
    """The forward pass, the backward pass and optimizer.step compiled as one graph (fullgraph=True; dynamo
    traces the backward with ``trace_autograd_ops``) equal the eager steps, without recompiling."""
    optimizer = make_optimizer(kind, **options)
    meta_params = off_initialisation(optimizer.init_meta_params(0), 0, scale=0.1)
    model, x, y = model_and_data()
    models = [model, copy.deepcopy(model)]
    optimizers = [LearnedOptimizer(m.parameters(), optimizer, meta_params, fused=fused) for m in models]

    def train_step(model, optimizer):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.detach()

    compiled = torch.compile(train_step, fullgraph=True)
    losses = []
    for step in range(5):
        for opt in optimizers:
            opt.zero_grad()  # torch.optim's zero_grad is not traced by dynamo
        eager = train_step(models[0], optimizers[0])
        if step == 0:  # the first step builds the state, eagerly
            traced = train_step(models[1], optimizers[1])
        else:
            with torch._dynamo.config.patch(trace_autograd_ops=True, error_on_recompile=step > 1):
                traced = compiled(models[1], optimizers[1])
        losses.append((eager, traced))
    for eager, traced in losses:
        torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-6)
    for eager, traced in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-6)
    assert not torch.equal(next(models[0].parameters()), next(model_and_data()[0].parameters()))
