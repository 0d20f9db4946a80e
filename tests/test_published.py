"""The seed's optimizers as published (OPT-ML, GitHub AfoninAndrei/OPT-ML): shapes, init, the step and
which weights meta-train, each checked against a reference that computes what the original's
``Optimizer_HNN`` / ``Optimizer_LSTM`` and ``one_step_fit_HNN`` compute (written here from its source)."""

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from torch import nn

from metaopt.cli import main
from metaopt.config import ConfigError, OptimizerConfig, validate_config
from metaopt.evaluate import Candidate, candidate_for, compare
from metaopt.meta import MetaTrainer, make_estimator, save_checkpoint
from metaopt.meta.trainer import FRESH_VALIDATION_STREAM
from metaopt.meta.unroll import rollout_losses
from metaopt.optimizers import make_optimizer
from metaopt.tasks import Quadratic, make_task, optimizee_seeds

QUADRATIC_HNN = {"preprocess": False, "out_mul": 0.001, "state": "scalar", "normalize_state": True, "init": "published"}
MNIST_HNN = {"preprocess": True, "out_mul": 0.001, "state": "scalar", "detach_state": True, "init": "published"}


class ReferenceHNN(nn.Module):
    """The original's HNN optimizer: its layers in its order, its forward on [gradient, state] rows."""

    def __init__(self, preprocess: bool):
        super().__init__()
        d = 2 if preprocess else 1
        self.g = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        self.v = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        self.D = nn.Linear(2 * d, 2 * d, bias=False)
        self.L = nn.Linear(d, d)
        self.output = nn.Linear(2 * d, 1, bias=False)
        self.output1 = nn.Linear(2 * d, 1)
        self.preprocess, self.d = preprocess, d

    @staticmethod
    def _log_sign(x):  # x [rows, 1], taken as data (the original's ``.data``)
        x = x.detach()
        out = torch.zeros(x.shape[0], 2)
        keep = (x.abs() >= math.exp(-10)).squeeze(1)
        out[keep, 0] = torch.log(x[keep].abs() + 1e-8).squeeze(1) / 10
        out[keep, 1] = torch.sign(x[keep]).squeeze(1)
        out[~keep, 0] = -1
        out[~keep, 1] = math.exp(10) * x[~keep].squeeze(1)
        return out

    def forward(self, gradient, state):
        q, p = (self._log_sign(gradient), self._log_sign(state)) if self.preprocess else (gradient, state)
        dh_q = self.v(q)
        d_q, d_p = self.D(torch.cat([dh_q, p], dim=-1)).chunk(2, dim=-1)
        mass = self.L.weight @ self.L.weight.T
        q_dot, p_dot = p - d_q, (-dh_q - d_p + self.g(q)) @ mass
        return self.output(torch.cat([q_dot, q], dim=-1)), self.output1(torch.cat([q_dot, p_dot], dim=-1))


REFERENCE_NAMES = {"g": "G", "v": "V", "output": "W_out", "output1": "W1"}


def ours(name: str) -> str:
    head, _, rest = name.partition(".")
    return f"{REFERENCE_NAMES.get(head, head)}.{rest}"


def reference_meta_gradient(reference: ReferenceHNN, quadratic, steps: int, normalize: bool) -> dict:
    """One truncation of ``one_step_fit_HNN`` from θ = 0: the summed loss before each update,
    backpropagated with the gradients detached (first order)."""
    W, y = quadratic
    theta = torch.zeros(W.shape[0], requires_grad=True)
    state = torch.zeros(W.shape[0], 1)
    total = 0.0
    for _ in range(steps):
        loss = ((W @ theta - y) ** 2).sum()
        total = total + loss
        (gradient,) = torch.autograd.grad(loss, theta, retain_graph=True)
        update, deriv = reference(gradient.reshape(-1, 1), state)
        state = deriv / torch.linalg.vector_norm(deriv) if normalize else deriv
        theta = theta + update.reshape(-1) * 0.001
    reference.zero_grad()
    total.backward()
    return {ours(n): torch.zeros_like(p) if p.grad is None else p.grad for n, p in reference.named_parameters()}


@pytest.mark.parametrize("preprocess, count", [(False, 19), (True, 55)])
def test_published_hnn_builds_the_originals_shapes_and_init(preprocess, count):
    optimizer = make_optimizer("hnn_seed", **(MNIST_HNN if preprocess else QUADRATIC_HNN))
    assert optimizer.num_meta_params() == count
    torch.manual_seed(3)
    reference = ReferenceHNN(preprocess)
    assert {ours(n): p for n, p in reference.named_parameters()}.keys() == optimizer.init_meta_params(3).keys()
    for name, value in reference.named_parameters():
        torch.testing.assert_close(optimizer.init_meta_params(3)[ours(name)], value.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("preprocess, count", [(False, 5221), (True, 5301)])
def test_published_lstm_builds_the_originals_shapes_and_init(preprocess, count):
    optimizer = make_optimizer("lstm", preprocess=preprocess, out_mul=1.0, init="published")
    assert optimizer.num_meta_params() == count
    torch.manual_seed(5)
    first, second, head = nn.LSTMCell(2 if preprocess else 1, 20), nn.LSTMCell(20, 20), nn.Linear(20, 1)
    meta_params = optimizer.init_meta_params(5)
    expected = {
        **{f"cells.0.{n}": p for n, p in first.named_parameters()},
        **{f"cells.1.{n}": p for n, p in second.named_parameters()},
        **{f"head.{n}": p for n, p in head.named_parameters()},
    }
    assert expected.keys() == meta_params.keys()
    for name, value in expected.items():
        torch.testing.assert_close(meta_params[name], value.detach(), rtol=0, atol=0)
    assert meta_params["head.weight"].abs().sum() > 0  # random, not zero as the improved variant


@pytest.mark.parametrize("options", [QUADRATIC_HNN, MNIST_HNN], ids=["quadratic", "mnist"])
def test_published_hnn_step_equals_the_originals(options):
    optimizer = make_optimizer("hnn_seed", **options)
    meta_params = optimizer.init_meta_params(1)
    torch.manual_seed(1)
    reference = ReferenceHNN(options["preprocess"])
    gradient, state = torch.randn(12) * torch.logspace(-6, 0, 12), torch.randn(12)
    update, new_state = optimizer.update(meta_params, gradient, {"p": state}, 0)
    expected_update, deriv = reference(gradient[:, None], state[:, None])
    torch.testing.assert_close(update, 0.001 * expected_update.squeeze(1).detach())
    if options.get("normalize_state"):
        deriv = deriv / torch.linalg.vector_norm(deriv)
    torch.testing.assert_close(new_state["p"], deriv.squeeze(1).detach())


@pytest.mark.parametrize(("options", "reached"), [(QUADRATIC_HNN, 18), (MNIST_HNN, 24)], ids=["quadratic", "mnist"])
def test_meta_gradient_reaches_exactly_the_originals_weights(options, reached):
    """Quadratic: every weight but L's unused bias (18 of 19); with preprocessing, the original's
    ``.data`` on the state leaves only V, the first half of D's rows and the read-out (24 of 55; fewer
    where a ReLU unit of V is dead for every input, in the original as here)."""
    family, seeds = Quadratic(), optimizee_seeds(0, 1, "meta_train")
    optimizer = make_optimizer("hnn_seed", **options)
    config = validate_config({"task": {"kind": "quadratic"}, "train": {"estimator": {"kind": "tbptt"}}}).train
    estimator = make_estimator(
        config.estimator, family, optimizer, lambda e: seeds, 6, 6, meta_loss="pre_update", partial_truncations=False
    )
    grads = estimator.estimate(optimizer.init_meta_params(0)).grads

    torch.manual_seed(0)
    reference = ReferenceHNN(options["preprocess"])
    optimizees = family.sample(seeds)
    quadratic = (optimizees.data["W"][0], optimizees.data["y"][0])
    expected = reference_meta_gradient(reference, quadratic, 6, options.get("normalize_state", False))
    assert sum(int((g != 0).sum()) for g in grads.values()) == reached
    for name, grad in expected.items():
        assert torch.equal(grads[name] != 0, grad != 0), name
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6)


def test_published_regime_drops_the_partial_truncation_and_draws_fresh_validation(tmp_path):
    """unroll 15 over 100 steps: 6 meta-steps an episode (the last 10 steps never meta-train);
    validation draws new optimizees each time and scores the mean loss before each update."""
    config = validate_config(
        {
            "task": {"kind": "quadratic"},
            "optimizer": {"kind": "hnn_seed", "options": QUADRATIC_HNN},
            "train": {
                **{"meta_steps": 13, "unroll": 15, "episode_length": 100, "batch_size": 1, "eval_runs": 4},
                **{"partial_truncations": False, "meta_loss": "pre_update", "grad_clip": None},
                **{"validation_metric": "mean", "validation_draw": "fresh", "eval_every": 6},
            },
            "device": "cpu",
        }
    )
    trainer = MetaTrainer(config, tmp_path)
    steps = [trainer.estimator.state.step if trainer.estimator.state else 0]
    for _ in range(13):
        trainer.meta_gradient_step()
        steps.append((trainer.estimator.episode, trainer.estimator.state.step))
    assert steps[6] == (0, 90) and steps[7] == (1, 15) and steps[13] == (2, 15)
    first, again = trainer.heldout_loss(), trainer.heldout_loss()
    assert first == again  # the same meta-step draws the same optimizees
    trainer.meta_step += 1
    assert trainer.heldout_loss() != first
    # The mean before each update: the mean over steps 0..99 of 100 steps, not the final loss.
    trainer.meta_step -= 1
    family, _ = trainer.validation[0]
    optimizees = family.sample(optimizee_seeds(0, 4, "meta_test", stream=FRESH_VALIDATION_STREAM + trainer.meta_step))
    meta_params = {k: v.detach() for k, v in trainer.meta_params.items()}
    losses = rollout_losses(family, trainer.optimizer, meta_params, optimizees, 100)
    assert first == pytest.approx(float(losses[:, :100].mean()), rel=1e-6)


def test_published_protocol_draws_optimizees_per_optimizer_and_scores_before_the_last_update():
    family = Quadratic()
    sgd = Candidate("sgd", lambda lr: make_optimizer("sgd", lr=0.01))
    shared = compare([sgd, sgd], family, steps=20, runs=5, seed=0, show_progress=False)
    published = compare([sgd, sgd], family, steps=20, runs=5, seed=0, show_progress=False, protocol="published")
    assert torch.equal(shared[0].losses, shared[1].losses)
    assert shared[0].losses.shape == (5, 21) and published[0].losses.shape == (5, 20)  # L(θ₀) .. L(θ₁₉)
    assert not torch.equal(published[0].losses[:, 0], published[1].losses[:, 0])  # other optimizees
    assert not torch.equal(published[0].losses[:, 0], shared[0].losses[:, 0])


def test_published_options_refuse_what_the_original_never_combined():
    with pytest.raises(ValueError, match="normalize_state needs state='scalar'"):
        make_optimizer("hnn_seed", normalize_state=True)
    with pytest.raises(ValueError, match="state must be 'vector' or 'scalar', got 'matrix'"):
        make_optimizer("hnn_seed", state="matrix")
    with pytest.raises(ValueError, match="init must be 'metaopt' or 'published', got 'xavier'"):
        make_optimizer("lstm", init="xavier")
    with pytest.raises(ConfigError, match=r"optimizer: unknown option\(s\) outmul for optimizer 'lstm'"):
        validate_config(
            {"task": {"kind": "quadratic"}, "optimizer": {"kind": "lstm", "evaluate_options": {"outmul": 1}}}
        )


def test_a_checkpoint_is_evaluated_with_replaced_options(tmp_path):
    """OPT-ML evaluates its MNIST LSTM at 10x the update scale it trained at: the same weights, out_mul 1."""
    lstm = make_optimizer("lstm", out_mul=0.1, init="published")
    checkpoint = save_checkpoint(tmp_path, 1, lstm, lstm.init_meta_params(0))
    as_trained = candidate_for(OptimizerConfig(checkpoint=str(checkpoint)), torch.device("cpu"), 10)
    scaled = candidate_for(
        OptimizerConfig(checkpoint=str(checkpoint), options={"out_mul": 1.0}), torch.device("cpu"), 10
    )
    grads = torch.randn(7)
    state = lstm.init_state(grads)
    first, _ = as_trained.build(None).update(as_trained.meta_params, grads, state, 0)
    second, _ = scaled.build(None).update(scaled.meta_params, grads, state, 0)
    torch.testing.assert_close(second, 10 * first)
    with pytest.raises(ValueError, match=r"unknown option\(s\) outmul for optimizer 'lstm'"):
        candidate_for(OptimizerConfig(checkpoint=str(checkpoint), options={"outmul": 1.0}), torch.device("cpu"), 10)


def test_metaopt_train_evaluates_with_the_evaluate_options(tmp_path):
    """evaluate_options reach the evaluation after meta-training: out_mul 0 makes no update at all."""
    config = {
        "task": {"kind": "quadratic"},
        "optimizer": {"kind": "lstm", "options": {"init": "published"}, "evaluate_options": {"out_mul": 0.0}},
        "train": {"meta_steps": 2, "unroll": 5, "episode_length": 10, "batch_size": 2, "eval_every": 2},
        "evaluate": {"steps": 10, "runs": 3, "protocol": "published", "optimizers": [{"kind": "sgd", "lr": 0.01}]},
        "device": "cpu",
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    output = tmp_path / "run"
    assert main(["train", str(path), "--output", str(output), "--no-progress", "--no-tracking"]) == 0
    curves = pd.read_parquet(output / "evaluation" / "curves.parquet")
    lstm = curves[curves.optimizer == "lstm"].pivot(index="run", columns="step", values="loss")
    assert lstm.shape == (3, 10)  # published: the losses before each of the 10 updates
    assert (lstm.to_numpy() == lstm.to_numpy()[:, :1]).all()
    sgd = curves[curves.optimizer == "sgd"].pivot(index="run", columns="step", values="loss")
    assert (sgd.to_numpy()[:, -1] < sgd.to_numpy()[:, 0]).all()


def make_task_from(task: dict):
    return make_task(validate_config({"task": task}).task, "meta_test")


def test_mnist_optimizees_take_pytorchs_default_init(mnist_root):
    data = {"root": mnist_root, "split": "test", "download": False}
    pytorch = make_task_from({"kind": "mnist_mlp", "init": "pytorch", "data": data})
    params = pytorch.sample([4]).params[0]
    first_weights, first_biases = params[: 784 * 20], params[784 * 20 : 784 * 20 + 20]
    assert first_weights.abs().max() <= 784**-0.5 and first_weights.abs().max() > 0.9 * 784**-0.5
    assert first_biases.abs().min() > 0  # U(±1/√784), not zero
    assert pytorch.sample([4]).params.equal(pytorch.sample([4]).params)
    normal = make_task_from({"kind": "mnist_mlp", "data": data}).sample([4]).params[0]
    assert normal[784 * 20 : 784 * 20 + 20].abs().max() == 0 and normal[: 784 * 20].std() < 0.002


def test_es_counts_the_losses_before_each_update_too():
    family, seeds = Quadratic(), optimizee_seeds(0, 2, "meta_train")
    optimizer = make_optimizer("hnn_seed", **QUADRATIC_HNN)
    config = validate_config({"task": {"kind": "quadratic"}, "train": {"estimator": {"kind": "pes", "pairs": 2}}}).train
    estimate = make_estimator(
        config.estimator, family, optimizer, lambda e: seeds, 5, 10, meta_loss="pre_update"
    ).estimate(optimizer.init_meta_params(0))
    assert all(torch.isfinite(g).all() for g in estimate.grads.values()) and math.isfinite(estimate.meta_loss)


def test_the_published_hnn_config_reaches_the_papers_quadratic_row(tmp_path):
    """The shipped config end to end (12,000 meta-steps, about 2 min on 2 cores): the HNN as published
    ends at or below 0.35 mean loss on the held-out quadratics (paper: 0.23, standard error about 0.08)."""
    output = tmp_path / "run"
    config = str(Path(__file__).resolve().parents[1] / "jobs/configs/train_quadratic_hnn_seed_published.yaml")
    assert main(["train", config, "--output", str(output), "--no-progress", "--no-tracking"]) == 0
    summary = pd.read_parquet(output / "evaluation" / "summary.parquet").set_index("optimizer")
    assert summary.loc["hnn_seed", "final_loss_mean"] <= 0.35
    assert summary.loc["hnn_seed", "steps"] == 99  # the loss before the 100th update
    assert summary.loc["hnn_seed (untrained)", "final_loss_mean"] > 5
