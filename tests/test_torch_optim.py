"""LearnedOptimizer: a metaopt optimizer stepping a real torch model like any torch.optim optimizer."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import metaopt
from jobs.benchmarks.common import off_initialisation
from metaopt.optimizers import make_optimizer, native
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


def learned_optimizer(source: str, params, **options) -> LearnedOptimizer:
    """``pretrained:general``, or a learned kind off its initialisation (hnn_seed's and lstm's zero read-out
    makes no update)."""
    if source.startswith("pretrained:"):
        return metaopt.load_optimizer(source, params, **options)
    learned = make_optimizer(source)
    return LearnedOptimizer(params, learned, off_initialisation(learned.init_meta_params(0), 0, scale=0.1), **options)


@pytest.fixture
def fresh_dynamo():
    """No compiled frames of earlier tests: recompile counts and limits start from zero."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


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


def trained_state_dict(shapes: list[tuple[int, ...]], named: bool = False) -> dict:
    """The state dict of a phnn LearnedOptimizer after one step of parameters of ``shapes``."""
    params = [torch.ones(shape, requires_grad=True) for shape in shapes]
    optimizer = phnn_optimizer([(f"w{i}", p) for i, p in enumerate(params)] if named else params)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    return optimizer.state_dict()


def test_the_state_is_shaped_like_each_parameter():
    saved = trained_state_dict([(4, 3), (5,), ()])
    assert [tuple(saved["state"][index]["p"].shape) for index in range(3)] == [(4, 3, 1), (5, 1), (1,)]


@pytest.mark.parametrize(
    ("saved_shapes", "message"),
    [
        (
            [(2, 6), (5,)],
            r"state 'p' of shape \[2, 6, 1\] for parameter 0 \(w0\) of shape \[4, 3\], which needs "
            r"\[4, 3, 1\]: it was saved for another model",
        ),
        ([(4, 3), (10, 7)], r"state 'p' of shape \[10, 7, 1\] for parameter 1 \(w1\) of shape \[5\], which needs"),
        ([(4, 3)], r"holds 1 parameters in group 0, but this LearnedOptimizer has 2: it was saved for another model"),
    ],
    ids=["same-sizes", "other-sizes", "fewer"],
)
def test_a_state_dict_for_parameters_of_other_shapes_is_refused_naming_the_parameter(saved_shapes, message):
    saved = trained_state_dict(saved_shapes, named=True)
    params = [torch.ones(4, 3, requires_grad=True), torch.ones(5, requires_grad=True)]
    optimizer = phnn_optimizer([("w0", params[0]), ("w1", params[1])])
    with pytest.raises(ValueError, match=message):
        optimizer.load_state_dict(saved)
    assert not optimizer.state  # nothing loaded
    optimizer.load_state_dict(trained_state_dict([(4, 3), (5,)]))  # its own shapes load


def test_a_state_dict_of_other_param_groups_flat_state_or_a_missing_count_is_refused():
    optimizer = phnn_optimizer([{"params": [torch.ones(4, 3, requires_grad=True)]}, {"params": []}])
    saved = trained_state_dict([(4, 3)])
    with pytest.raises(ValueError, match=r"^state_dict holds 1 parameter groups, but this LearnedOptimizer has 2: "):
        optimizer.load_state_dict(saved)
    optimizer = phnn_optimizer([torch.ones(4, 3, requires_grad=True)])
    flat = copy.deepcopy(saved)
    flat["state"][0]["p"] = flat["state"][0]["p"].reshape(12, 1)  # as metaopt saved it before: flat
    with pytest.raises(
        ValueError,
        match=r"^state_dict holds flat state 'p' of shape \[12, 1\] for parameter 0 of shape \[4, 3\]: "
        r"it was saved by an older metaopt",
    ):
        optimizer.load_state_dict(flat)
    uncounted = copy.deepcopy(saved)
    del uncounted["state"][0]["step"]
    with pytest.raises(ValueError, match=r"^state_dict holds no 'step' count for parameter 0$"):
        optimizer.load_state_dict(uncounted)
    unlisted = copy.deepcopy(saved)
    unlisted["state"][7] = unlisted["state"].pop(0)
    with pytest.raises(ValueError, match=r"^state_dict holds state for parameter 7, which none of its param_groups"):
        optimizer.load_state_dict(unlisted)


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


@pytest.mark.parametrize("lr", [0.0, -1, float("nan"), float("inf")])
def test_an_lr_that_is_not_finite_and_positive_is_refused(lr):
    model, _, _ = model_and_data()
    with pytest.raises(ValueError, match=r"^lr must be > 0 and finite \(a multiplier on the learned updates"):
        phnn_optimizer(model.parameters(), lr=lr)
    with pytest.raises(ValueError, match=r"^param group 1: lr must be > 0 and finite .*; got"):
        phnn_optimizer([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": lr}])
    optimizer = phnn_optimizer(model[0].parameters())
    with pytest.raises(ValueError, match="^param group 1: lr must be > 0"):
        optimizer.add_param_group({"params": model[2].parameters(), "lr": lr})
    assert len(optimizer.param_groups) == 1  # the refused group is not kept


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr": True}, r"lr must be a real number \(a multiplier on the learned updates, 1.0 as trained\); got True"),
        ({"lr": "1"}, "lr must be a real number .*; got '1' of type str"),
        ({"lr": torch.tensor(1.0)}, "lr must be a real number .* of type Tensor"),
        ({"horizon": 2.5}, r"horizon must be None or an int \(the steps of the run\); got 2.5"),
        ({"horizon": True}, "horizon must be None or an int .*; got True"),
        ({"horizon": "10"}, "horizon must be None or an int .*; got '10'"),
        ({"fused": 1}, "fused must be None, True or False; got 1"),
        ({"fused": "yes"}, "fused must be None, True or False; got 'yes'"),
        ({"compile": None}, "compile must be True or False; got None"),
    ],
)
def test_options_of_the_wrong_type_are_refused(options, message):
    model, _, _ = model_and_data()
    with pytest.raises(TypeError, match=f"^{message}"):
        metaopt.load_optimizer("pretrained:general", model.parameters(), **options)


@pytest.mark.parametrize("horizon", [0, -3])
def test_a_horizon_that_is_not_positive_is_refused(horizon):
    model, _, _ = model_and_data()
    with pytest.raises(ValueError, match=rf"^horizon must be > 0 \(the steps of the run\); got {horizon}$"):
        metaopt.load_optimizer("pretrained:general", model.parameters(), horizon=horizon)


def test_a_complex_parameter_is_refused_when_it_is_added():
    model, _, _ = model_and_data()
    weight = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    message = (
        r"^LearnedOptimizer does not support complex parameters \(got a complex64 parameter of shape \[3\]\); "
        r"view it as real with torch.view_as_real$"
    )
    with pytest.raises(TypeError, match=message):
        phnn_optimizer([*model.parameters(), weight])
    optimizer = phnn_optimizer(model.parameters())
    with pytest.raises(TypeError, match=message):
        optimizer.add_param_group({"params": [weight]})
    assert len(optimizer.param_groups) == 1


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
@pytest.mark.usefixtures("fresh_dynamo")
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
            if index == 0:
                opt.step()
            else:  # from the first step, which builds the state; the second recompiles once, for the built state
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
@pytest.mark.usefixtures("fresh_dynamo")
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
        with torch._dynamo.config.patch(trace_autograd_ops=True, error_on_recompile=step > 1):
            traced = compiled(models[1], optimizers[1])
        losses.append((eager, traced))
    for eager, traced in losses:
        torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-6)
    for eager, traced in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-6)
    assert not torch.equal(next(models[0].parameters()), next(model_and_data()[0].parameters()))


@pytest.mark.usefixtures("fresh_dynamo")
def test_a_compiled_step_equals_the_eager_one_from_the_first_step_and_after_loading_unequal_step_counts(monkeypatch):
    """``torch.compile(optimizer.step, fullgraph=True)`` of ``pretrained:general`` on a fresh multi-parameter
    model, from its first step (which builds the state in the graph, and runs before any eager step has
    loaded the fused kernel), then on a resumed one whose parameters were saved at different step counts
    (read when loaded, not in the traced step); no recompile after the second step of each."""
    monkeypatch.setattr(native, "_libraries", {})  # as in a fresh process: no kernel loaded yet
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))

    def train_both(models, optimizers, steps: int) -> None:
        compiled = torch.compile(optimizers[1].step, fullgraph=True)
        for step in range(steps):
            for m, opt in zip(models, optimizers):
                opt.zero_grad()
                nn.functional.cross_entropy(m(x), y).backward()
            with torch._dynamo.config.patch(error_on_recompile=step > 1):
                compiled()
            optimizers[0].step()
        for eager, traced in zip(*(m.parameters() for m in models)):
            torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-6)

    models = [model, copy.deepcopy(model)]
    train_both(models, [metaopt.load_optimizer("pretrained:general", m.parameters()) for m in models], steps=4)

    first_layer_frozen = metaopt.load_optimizer("pretrained:general", model.parameters())
    model[0].requires_grad_(False)
    train(model, first_layer_frozen, x, y, steps=1)
    model[0].requires_grad_(True)
    train(model, first_layer_frozen, x, y, steps=1)
    saved = first_layer_frozen.state_dict()
    assert [int(saved["state"][index]["step"]) for index in range(4)] == [1, 1, 2, 2]
    models = [model, copy.deepcopy(model)]
    resumed = [metaopt.load_optimizer("pretrained:general", m.parameters()) for m in models]
    for optimizer in resumed:
        optimizer.load_state_dict(saved)
    train_both(models, resumed, steps=4)
    assert [int(resumed[1].state[p]["step"]) for p in models[1].parameters()] == [5, 5, 6, 6]


class ConvNet(nn.Module):
    """Two convolutions and a read-out weight ``head`` that is a transposed view (not contiguous)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Conv2d(4, 2, 3), nn.Flatten())
        self.head = nn.Parameter(torch.randn(3, 32).t() / 6)

    def forward(self, x):
        return self.features(x) @ self.head


@pytest.mark.parametrize(
    ("source", "fused"),
    [("pretrained:general", None), ("pretrained:general", True), ("pretrained:general", False)]
    + [("hnn_seed", True), ("lstm", True)],
    ids=["general", "general-fused", "general-batched", "hnn_seed-fused", "lstm-fused"],
)
def test_channels_last_and_transposed_parameters_train_in_place_as_contiguous_ones_do(source, fused):
    """A channels_last conv net with a transposed read-out weight trains as its contiguous twin does (fused=True:
    through the kernel), each parameter updated in its own storage and memory format; the state, in row-major
    order and shaped like each parameter, is the same."""
    torch.manual_seed(0)
    strided = ConvNet()
    contiguous = copy.deepcopy(strided)
    contiguous.head = nn.Parameter(contiguous.head.detach().contiguous())
    strided.to(memory_format=torch.channels_last)
    convolutions = [strided.features[0].weight, strided.features[2].weight]
    assert not any(p.is_contiguous() for p in [*convolutions, strided.head])
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 3, (16,))
    storages, initial = [p.data_ptr() for p in strided.parameters()], copy.deepcopy(strided)
    optimizers = [learned_optimizer(source, m.parameters(), fused=fused) for m in (strided, contiguous)]
    losses = [train(m, opt, x, y, steps=5) for m, opt in zip((strided, contiguous), optimizers)]

    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    for p, q, before in zip(strided.parameters(), contiguous.parameters(), initial.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
        assert not torch.equal(p, before)
    assert [p.data_ptr() for p in strided.parameters()] == storages
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convolutions)
    assert strided.head.stride() == (1, 32)
    states = [opt.state_dict()["state"] for opt in optimizers]
    for index, p in enumerate(strided.parameters()):
        for key, value in states[0][index].items():
            assert key == "step" or value.shape[: p.dim()] == p.shape
            torch.testing.assert_close(value, states[1][index][key], rtol=1e-4, atol=1e-5)
