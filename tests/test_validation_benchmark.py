"""``metaopt benchmark`` scored on validation data: the tuned AdamW, the tuning-free peers and learned optimizers
on real modules, the selection mark, and learned optimizers over meta-training seeds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from metaopt import cli
from metaopt.benchmark import ModuleData, Peer, Suite, make_peer, resolve_learned, validation
from metaopt.benchmark.validation import (
    run_validated,
    seed_aggregate,
    validation_figure,
    validation_speedup,
)
from metaopt.config import validate_config
from metaopt.meta import MetaTrainer, load_checkpoint
from metaopt.meta.checkpoint import save_checkpoint
from metaopt.optimizers import make_optimizer
from metaopt.tasks.module import load_factory

PEERS = ["schedule_free_adamw", "prodigy", "adamw_warmup_cosine"]


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def validation_suite(tmp_path: Path, name: str = "tiny_validation", **changes) -> Path:
    """Two small digits tasks (an MLP, a CNN with BatchNorm), 2 runs, AdamW at 2 rates × 2 schedules."""
    suite = {
        "score": "validation",
        "runs": 2,
        "seed": 1,
        "eval_every": 5,
        "baselines": {"lrs": [0.003, 0.03]},
        "tasks": [
            {"name": "mlp", "task": {"kind": "module", "factory": "validation_tasks:digits_mlp"}, "steps": 20},
            {"name": "bn_cnn", "task": {"kind": "module", "factory": "validation_tasks:digits_bn_cnn"}, "steps": 20},
        ],
        **changes,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def marked_checkpoint(tmp_path: Path, selected_on: list[str]) -> Path:
    """An untrained phnn (heavy ball) whose spec says which task sets selected it."""
    optimizer = make_optimizer("phnn", init_lr=0.05)
    params = optimizer.init_meta_params(0)
    return save_checkpoint(tmp_path / "ckpt", 0, optimizer, params, extra_spec={"selected_on": selected_on})


def test_a_validation_suite_scores_held_out_data_marks_selection_and_reuses_its_cache(tmp_path, capsys):
    suite, cache = validation_suite(tmp_path), tmp_path / "cache"
    marked = marked_checkpoint(tmp_path, ["tiny_validation"])
    args = [str(suite), "--cache-dir", str(cache), "--no-progress"]
    learned = ["--optimizer", "general@s0=pretrained:general", "--optimizer", f"general@s1={marked}"]
    first = tmp_path / "first"
    assert cli.main(["benchmark", *args, *learned, "--output", str(first)]) == 0
    out = capsys.readouterr().out
    assert out.count("tuned 4 baselines and ran 3 peers in") == 2

    results = pd.read_parquet(first / "results.parquet")
    optimizers = ["adamw", *PEERS, "general@s0", "general@s1"]
    assert list(zip(results.task, results.optimizer)) == [(t, o) for t in ("mlp", "bn_cnn") for o in optimizers]
    assert set(results.schedule[results.optimizer == "adamw"]) <= {"constant", "warmup_cosine"}
    assert (results.validation_loss_ratio[results.optimizer == "adamw"] == 1).all()
    assert np.isfinite(results.final_validation_loss).all() and not results.diverged.any()
    assert ((results.final_metric > 0) & (results.final_metric <= 1)).all()
    assert (results.validation_speedup >= 0).all()
    assert results.peer.tolist() == [o in PEERS for o in optimizers] * 2

    curves = pd.read_parquet(first / "curves.parquet")
    train, validation = curves[curves.split == "train"], curves[curves.split == "validation"]
    # Every optimizer starts each run from the same parameters on the same minibatch.
    step0 = train[train.step == 0].groupby(["task", "run"]).loss
    assert (step0.max() - step0.min()).max() < 1e-6 and train.optimizer.nunique() == 6
    # and the same initial validation loss, but schedule-free's on BatchNorm, recomputed before evaluating
    initial = validation[validation.step == 0].set_index(["task", "optimizer", "run"]).loss.unstack("optimizer")
    np.testing.assert_allclose(initial.drop(columns="schedule_free_adamw").T, initial[["adamw"] * 5].T, rtol=1e-6)
    np.testing.assert_allclose(initial.schedule_free_adamw["mlp"], initial.adamw["mlp"], rtol=1e-6)
    assert (abs(initial.schedule_free_adamw["bn_cnn"] - initial.adamw["bn_cnn"]) > 1e-4).all()
    assert sorted(set(validation.step)) == [0, 5, 10, 15, 20] and len(train) == 2 * 6 * 2 * 20
    # What is scored is the validation data: the initial models' validation loss is not their training loss.
    both = train[train.step == 0].merge(validation[validation.step == 0], on=["task", "optimizer", "run"])
    assert (abs(both.loss_x - both.loss_y) > 1e-3).all()
    last = validation[validation.step == 20].groupby(["task", "optimizer"], sort=False).loss.mean()
    scored = results.set_index(["task", "optimizer"]).final_validation_loss
    np.testing.assert_allclose(scored.loc[last.index], last, rtol=1e-9)

    report = (first / "results.md").read_text()
    assert "| task | optimizer | final validation loss | metric | validation loss ratio | validation speedup" in report
    assert "| general@s1† |" in report and "| general@s0 |" in report and "† selected on this suite" in report
    assert results.selected_on_this_suite.tolist() == [o == "general@s1" for o in optimizers] * 2
    assert "| general | 2 |" in report  # the learned optimizer over its two meta-training seeds
    assert (first / "validation_curves.png").stat().st_size > 10_000

    cached = {path: path.stat().st_mtime_ns for path in cache.rglob("*.parquet")}
    second = tmp_path / "second"
    assert cli.main(["benchmark", *args, "--optimizer", "pretrained:general", "--output", str(second)]) == 0
    out = capsys.readouterr().out
    assert out.count("tuned AdamW and peers cached") == 2 and "baselines and ran" not in out
    assert {path: path.stat().st_mtime_ns for path in cache.rglob("*.parquet")} == cached
    again = pd.read_parquet(second / "results.parquet")
    kept = results[~results.learned].reset_index(drop=True)
    pd.testing.assert_frame_equal(again[~again.learned].reset_index(drop=True), kept)
    # pretrained:general was selected on suite_heldout, not on this suite: no mark here.
    assert not again.selected_on_this_suite.any() and "†" not in (second / "results.md").read_text()


def test_a_validation_suite_needs_validation_data_and_adamw(tmp_path, capsys):
    suite = validation_suite(
        tmp_path,
        tasks=[
            {
                "name": "none",
                "task": {"kind": "module", "factory": "validation_tasks:digits_without_validation"},
                "steps": 5,
            }
        ],
    )
    assert cli.main(["benchmark", str(suite), "--cache-dir", str(tmp_path), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert "task none: score: validation needs held-out data" in error and "without validation_inputs" in error
    suite = validation_suite(tmp_path, baselines={"kinds": ["adam"]})
    assert cli.main(["benchmark", str(suite), "--no-progress"]) == 2
    assert "baselines.kinds must hold adamw" in capsys.readouterr().err


def test_schedule_free_is_evaluated_at_its_average_with_batch_norm_recomputed(monkeypatch):
    spec = load_factory("validation_tasks:digits_bn_cnn")()
    data = ModuleData(spec, spec.inputs, spec.targets, 32)
    suite = Suite.model_validate(
        {
            "score": "validation",
            "eval_every": 4,
            "tasks": [{"name": "t", "task": {"factory": "validation_tasks:digits_bn_cnn"}, "steps": 8}],
        }
    )
    recomputed, evaluated = [], []
    real_recompute, real_evaluate = validation.recompute_batch_norm, validation.evaluate

    def recompute(model, *args):
        norm = model[1]
        before = norm.running_mean.clone(), norm.num_batches_tracked.clone()
        assert real_recompute(model, *args)
        recomputed.append((before, (norm.running_mean.clone(), norm.num_batches_tracked.clone())))
        return True

    def evaluate(spec, model, batch_size):
        evaluated.append(
            ([p.detach().clone() for p in model.parameters()], optimizers[-1].optimizer.param_groups[0]["train_mode"])
        )
        loss = real_evaluate(spec, model, batch_size)
        assert model.training  # back in train() mode for the next update
        return loss

    monkeypatch.setattr(validation, "recompute_batch_norm", recompute)
    monkeypatch.setattr(validation, "evaluate", evaluate)
    optimizers = []

    def make(params):
        optimizers.append(make_peer(Peer("schedule_free_adamw", 0.0025, "constant"), params, 8, suite))
        return optimizers[-1]

    curves = run_validated(data, [11], 8, suite, make)
    assert len(evaluated) == 3 and len(recomputed) == 3  # after 0, 4 and 8 updates
    assert not any(train_mode for _, train_mode in evaluated)  # evaluated in the optimizer's eval mode
    # The evaluation weights (the average x) differ from the weights gradients are taken at (y), restored after.
    trained = list(optimizers[-1].optimizer.param_groups[0]["params"])
    assert optimizers[-1].optimizer.param_groups[0]["train_mode"]
    assert any(not torch.equal(x, y.detach()) for x, y in zip(evaluated[-1][0], trained))
    # The BatchNorm statistics were recomputed over 8 training batches at the evaluation weights.
    (mean_before, _), (mean_after, count_after) = recomputed[-1]
    assert not torch.allclose(mean_before, mean_after) and int(count_after) == suite.peers.bn_batches
    assert torch.isfinite(curves.validation).all() and curves.validation.shape == (1, 3)


def test_a_model_without_batch_norm_is_left_alone():
    spec = load_factory("validation_tasks:digits_mlp")()
    model = spec.model()
    assert not validation.recompute_batch_norm(model, ModuleData(spec, spec.inputs, spec.targets, 8), 0, 2)


def test_the_validation_speedup_interpolates_between_evaluations():
    at, curve, steps = np.array([0, 10, 20, 30]), np.array([2.0, 1.0, 0.6, 0.5]), 30
    assert validation_speedup(0.5, at, curve, steps) == (1.0, False)  # the tuned AdamW's own final loss
    assert validation_speedup(0.8, at, curve, steps) == pytest.approx((15 / 30, False))  # halfway from 10 to 20
    assert validation_speedup(0.4, at, curve, steps) == (1.0, True)  # never reached: ≥ 1
    assert validation_speedup(math.inf, at, curve, steps) == (0.0, False)  # diverged: reached before any update
    assert math.isnan(validation_speedup(0.8, at, np.array([2.0, math.inf, 1.0, 0.5]), steps)[0])


def test_seed_aggregation_on_a_synthetic_table():
    rows = []
    for task in range(4):
        # optimizer a: every task's seeds have log ratios -1, 0, 2, the median (0) at seed `-task % 3`
        for seed, value in zip(np.roll(np.arange(3), task), [0.0, -1.0, 2.0]):
            rows.append({"task": f"t{task}", "optimizer": "a", "seed": int(seed), "value": value})
        for seed in range(3):  # optimizer b: log ratio 0.1 × (task + 1) on every seed
            rows.append({"task": f"t{task}", "optimizer": "b", "seed": seed, "value": 0.1 * (task + 1)})
    table = pd.DataFrame(rows)
    table["reference"] = 2.0
    table["loss"] = 2.0 * np.exp(table.value)
    summary, medians = seed_aggregate(table.drop(columns="value"))
    a, b = summary.set_index("optimizer").loc["a"], summary.set_index("optimizer").loc["b"]
    # 12 values each; the interquartile mean drops 3 from each end
    assert a.iqm_log_ratio == pytest.approx(1 / 6) and a.ci_low == pytest.approx(1 / 6) == a.ci_high
    assert b.iqm_log_ratio == pytest.approx(0.25) and 0.1 <= b.ci_low < 0.25 < b.ci_high <= 0.4
    assert a.tasks == 4 and a.seeds == 3
    chosen = medians[medians.optimizer == "a"].set_index("task").seed
    assert chosen.to_dict() == {f"t{task}": -task % 3 for task in range(4)}
    again, _ = seed_aggregate(table.drop(columns="value"))
    pd.testing.assert_frame_equal(summary, again)  # a fixed RNG seed


def test_the_validation_plot_has_a_labelled_log_axis_per_task():
    curves = pd.DataFrame(
        {
            "split": "validation",
            "task": ["x"] * 4 + ["y"] * 4,
            "optimizer": ["adamw", "adamw", "prodigy", "prodigy"] * 2,
            "run": 0,
            "step": [0, 10] * 4,
            "loss": [2.0, 1.0, 2.0, 0.5, 3.0, 1.0, 3.0, math.inf],
        }
    )
    figure = validation_figure(curves, "two")
    axes = [axis for axis in figure.axes if axis.get_visible()]
    assert [axis.get_title() for axis in axes] == ["x", "y"]
    for axis in axes:
        assert axis.get_yscale() == "log" and axis.get_xlabel() == "step" and axis.get_ylabel() == "validation loss"
        assert [text.get_text() for text in axis.get_legend().get_texts()] == ["adamw", "prodigy"]


def test_the_peers_run_on_a_training_loss_suite_beside_the_batched_baselines(tmp_path, capsys):
    suite = {
        "runs": 2,
        "seed": 3,
        "speedup_cap": 2,
        "baselines": {"lrs": [0.01, 0.1]},
        "tasks": [
            {"name": "iris", "task": {"kind": "module", "factory": "metaopt.tasks.heldout:iris_logistic"}, "steps": 20}
        ],
    }
    path = tmp_path / "train_suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    args = ["benchmark", str(path), "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert cli.main([*args, "--output", str(tmp_path / "plain")]) == 0
    assert "iris: peers" not in capsys.readouterr().out  # a training-loss suite runs no peers unless it names them
    assert cli.main([*args, "--set", "peers.kinds=all", "--output", str(tmp_path / "peers")]) == 0
    out = capsys.readouterr().out
    assert "baselines cached" in out and "peers ran; cached in" in out  # the baselines' cache is unchanged
    results = pd.read_parquet(tmp_path / "peers" / "results.parquet")
    assert results.optimizer.tolist() == ["adam", "adamw", "sgd_momentum", *PEERS]
    assert results.peer.tolist() == [False] * 3 + [True] * 3 and not results.learned.any()
    assert np.isfinite(results.final_loss).all() and (results.speedup > 0).all()
    curves = pd.read_parquet(tmp_path / "peers" / "curves.parquet")
    step0 = curves[curves.step == 0].groupby("run").loss
    assert (step0.max() - step0.min()).max() < 1e-6
    assert "| prodigy (lr 1, cosine) |" in (tmp_path / "peers" / "results.md").read_text()
    assert cli.main([*args, "--set", "peers.kinds=all", "--output", str(tmp_path / "again")]) == 0
    assert "peers cached" in capsys.readouterr().out
    again = pd.read_parquet(tmp_path / "again" / "results.parquet")
    assert again.final_loss.tolist() == results.final_loss.tolist()


def test_the_shipped_optimizer_records_its_selection_suite_and_still_loads():
    learned = resolve_learned("pretrained:general")
    assert learned.selected_on == ("suite_heldout",)
    _, _, spec = load_checkpoint(learned.folder)  # its weights' digest still verifies
    model = torch.nn.Linear(3, 2)
    from metaopt import load_optimizer

    load_optimizer("pretrained:general", model.parameters())
    assert spec["selected_on"] == ["suite_heldout"]


def test_a_meta_training_runs_best_checkpoint_records_what_selected_it(tmp_path):
    config = validate_config(
        {
            "task": {"kind": "quadratic"},
            "optimizer": {"kind": "phnn"},
            "train": {"meta_steps": 1, "unroll": 2, "episode_length": 4, "batch_size": 2, "eval_runs": 2},
            "device": "cpu",
        }
    )
    trainer = MetaTrainer(config, tmp_path / "run")
    spec = json.loads((trainer.save("best") / "spec.json").read_text())
    assert spec["selected_on"] == ["meta_validation:task:quadratic"]
    assert "selected_on" not in json.loads((trainer.save() / "spec.json").read_text())
