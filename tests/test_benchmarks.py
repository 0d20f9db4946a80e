"""The benchmark suite's own checks on tiny sizes (no timing assertions), and activation
checkpointing of the unroll."""

from __future__ import annotations

import json
import tempfile

import pytest
import torch

from jobs.benchmarks import meta_train_memory, meta_train_throughput, optimizer_step
from jobs.benchmarks.common import off_initialisation
from jobs.benchmarks.meta_train_throughput import GradientMismatch, benchmark_config, check_same_meta_gradient
from metaopt.config import validate_config
from metaopt.meta import MetaTrainer, start_episode, unroll
from metaopt.optimizers import make_optimizer
from metaopt.tasks import Quadratic, optimizee_seeds

CPU = torch.device("cpu")


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads.values()])


@pytest.mark.parametrize("kind", ["phnn", "hnn_seed", "lstm"])
def test_reference_loop_computes_our_meta_gradient_on_quadratics(kind, tmp_path):
    config = benchmark_config("quadratic", kind, CPU, unroll=3, batch_size=3)
    meta_params = off_initialisation(config.optimizer.build().init_meta_params(0), 0)
    _, _, error = check_same_meta_gradient(config, meta_params, CPU, rtol=1e-3, atol_scale=1e-5, run_dir=tmp_path)
    assert error < 1e-4


def test_reference_loop_computes_our_meta_gradient_on_mnist(mnist_root, tmp_path):
    config = benchmark_config("mnist", "phnn", CPU, unroll=2, batch_size=2, mnist_root=mnist_root)
    meta_params = config.optimizer.build().init_meta_params(0)
    check_same_meta_gradient(config, meta_params, CPU, rtol=1e-3, atol_scale=1e-5, run_dir=tmp_path)


def test_gradient_check_fails_when_the_reference_gets_other_meta_params(tmp_path):
    config = benchmark_config("quadratic", "phnn", CPU, unroll=3, batch_size=3)
    meta_params = config.optimizer.build().init_meta_params(0)

    class Perturbed(meta_train_throughput.ReferenceTrainer):
        def __init__(self, config, meta_params, device):
            super().__init__(config, {k: v + 0.01 for k, v in meta_params.items()}, device)

    original = meta_train_throughput.ReferenceTrainer
    meta_train_throughput.ReferenceTrainer = Perturbed
    try:
        with pytest.raises(GradientMismatch, match="meta-gradients differ"):
            check_same_meta_gradient(config, meta_params, CPU, rtol=1e-3, atol_scale=1e-5, run_dir=tmp_path)
    finally:
        meta_train_throughput.ReferenceTrainer = original


def test_throughput_benchmark_writes_its_table_as_json(tmp_path, monkeypatch):
    output = tmp_path / "throughput.json"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    meta_train_throughput.main(
        [
            "--tasks",
            "quadratic",
            "--kinds",
            "hnn_seed",
            "--meta-steps",
            "1",
            "--reference-meta-steps",
            "1",
            "--device",
            "cpu",
            "--output",
            str(output),
        ]
    )
    saved = json.loads(output.read_text())
    assert saved["benchmark"] == "meta_train_throughput" and {"cpu_count", "torch"} <= set(saved["machine"])
    (row,) = saved["rows"]
    assert {
        "ours_optimizee_steps_per_s",
        "ours_meta_steps_per_s",
        "reference_optimizee_steps_per_s",
        "reference_meta_steps_per_s",
        "speedup",
        "gradient_max_rel_error",
    } <= set(row)
    assert row["speedup"] > 0
    assert list(scratch.iterdir()) == []  # the trainer's scratch run folder is removed


def test_a_float32_disagreement_is_rechecked_in_float64():
    # A tolerance float32 cannot meet: the check must fall back to float64, where both loops agree.
    row = meta_train_throughput.run(
        "quadratic", "phnn", CPU, meta_steps=1, reference_meta_steps=1, unroll=4, rtol=0.0, atol_scale=0.0, batch_size=4
    )
    assert row["gradient_max_rel_error"] > 0
    assert row["gradient_max_rel_error_float64"] < 1e-9
    assert torch.get_default_dtype() == torch.float32  # restored for the timed run and everything after


def test_optimizer_step_benchmark_writes_its_table_as_json(tmp_path):
    output = tmp_path / "step.json"
    optimizer_step.main(
        [
            "--sizes",
            "10000",
            "--kinds",
            "phnn",
            "hnn_seed",
            "pretrained:general",
            "--compile",
            "--device",
            "cpu",
            "--repeats",
            "1",
            "--warmup",
            "1",
            "--output",
            str(output),
        ]
    )
    rows = json.loads(output.read_text())["rows"]
    names = {row["optimizer"] for row in rows}
    assert {"adam (foreach)", "phnn", "hnn_seed", "hnn_seed (fused)", "pretrained:general (fused)"} <= names
    shipped = next(row for row in rows if row["optimizer"] == "pretrained:general (fused)")
    assert shipped["state_vs_adam"] == pytest.approx(1.0, rel=1e-2)  # p and the gradient's running mean square
    phnn = next(row for row in rows if row["optimizer"] == "phnn")
    assert {"step_ms", "time_vs_adam_foreach", "state_mb", "state_vs_adam"} <= set(phnn)
    assert phnn["state_vs_adam"] == pytest.approx(
        0.5, rel=1e-2
    )  # one momentum-like float vs Adam's two (and its step counters)


def test_memory_benchmark_measures_and_cross_checks_checkpointing(tmp_path, mnist_root):
    output = tmp_path / "memory.json"
    rows = meta_train_memory.main(
        [
            "--unrolls",
            "20",
            "--checkpoint-steps",
            "2",
            "--optimizees",
            "1",
            "--kind",
            "hnn_seed",
            "--mnist-root",
            mnist_root,
            "--device",
            "cpu",
            "--output",
            str(output),
        ]
    )
    assert len(rows) == 2 and all(row["peak_above_baseline_mb"] >= 0 for row in rows)
    assert {"unroll", "checkpointing", "peak_total_mb", "vs_unroll_20", "meta_grad_norm"} <= set(
        json.loads(output.read_text())["rows"][0]
    )
    tampered = [dict(row) for row in rows]
    tampered[-1]["meta_grad_norm"] *= 1.01
    with pytest.raises(AssertionError, match="checkpointing changed"):
        meta_train_memory.check_same_meta_gradient(tampered)


@pytest.mark.parametrize("kind", ["phnn", "hnn_seed", "lstm"])
@pytest.mark.parametrize("second_order", [False, True])
def test_checkpointed_unroll_gives_the_same_losses_state_and_meta_gradient(kind, second_order):
    family, optimizer = Quadratic(), make_optimizer(kind)
    meta_params = {k: v.requires_grad_(True) for k, v in off_initialisation(optimizer.init_meta_params(0), 0).items()}
    state = start_episode(family.sample(optimizee_seeds(0, 4, "meta_train")), optimizer)
    results = []
    for checkpoint_steps in (0, 3):  # 10 steps: chunks of 3, 3, 3, 1
        losses, end = unroll(family, optimizer.update, meta_params, state, 10, second_order, checkpoint_steps)
        grads = torch.autograd.grad(losses.mean(1).sum(), list(meta_params.values()), allow_unused=True)
        results.append((losses.detach(), end.params.detach(), torch.cat([g.reshape(-1) for g in grads])))
    (plain_losses, plain_end, plain_grad), (losses, end, grad) = results
    torch.testing.assert_close(losses, plain_losses)
    torch.testing.assert_close(end, plain_end)
    # Chunks sum the steps' meta-gradients in another order: float32 rounding of the largest entry.
    torch.testing.assert_close(grad, plain_grad, rtol=1e-5, atol=1e-6 * plain_grad.abs().max().item())


def test_train_config_wires_checkpointing_to_the_estimator(tmp_path):
    def config(steps):
        return validate_config(
            {
                "task": {"kind": "quadratic"},
                "optimizer": {"kind": "phnn"},
                "device": "cpu",
                "train": {
                    "meta_steps": 2,
                    "unroll": 6,
                    "episode_length": 12,
                    "batch_size": 4,
                    "eval_runs": 2,
                    "unroll_checkpoint_steps": steps,
                },
            }
        )

    plain, checkpointed = MetaTrainer(config(0), tmp_path / "a"), MetaTrainer(config(2), tmp_path / "b")
    assert checkpointed.estimator.checkpoint_steps == 2
    for _ in range(2):
        plain.meta_gradient_step(), checkpointed.meta_gradient_step()
    torch.testing.assert_close(flat(plain.meta_params).detach(), flat(checkpointed.meta_params).detach())
