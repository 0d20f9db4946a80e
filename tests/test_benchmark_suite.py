"""``metaopt benchmark``: learned optimizers against per-task tuned baselines on a suite of held-out tasks."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from jobs import profile_steps
from metaopt import cli
from metaopt.benchmark import (
    Baseline,
    BaselineGrid,
    final_loss,
    load_suite,
    resolve_learned,
    run_baselines,
    run_learned,
    smoothed,
    speedup,
    speedup_figure,
)
from metaopt.meta.checkpoint import save_checkpoint
from metaopt.optimizers import make_optimizer
from metaopt.tasks import ModuleTask, make_task, optimizee_seeds
from metaopt.tasks.module import load_factory

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_SUITE = REPO_ROOT / "jobs" / "configs" / "suite_heldout.yaml"
COLUMNS = {"task", "optimizer", "final_loss", "loss_ratio", "speedup", "speedup_capped", "diverged"}
COLUMNS |= {"baseline", "baseline_lr", "baseline_schedule"}


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as ``metaopt benchmark`` runs: the models are small and the machine may be busy."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_suite(tmp_path: Path, **changes) -> Path:
    """A two-task suite that runs in seconds."""
    suite = {
        "runs": 2,
        "seed": 3,
        "speedup_cap": 2,
        "baselines": {"lrs": [0.01, 0.1], "schedules": ["constant", "cosine"]},
        "tasks": [
            {"name": "iris", "task": {"kind": "module", "factory": "metaopt.tasks.heldout:iris_logistic"}, "steps": 20},
            {
                "name": "wine",
                "task": {"kind": "module", "factory": "metaopt.tasks.heldout:wine_mlp", "batch_size": 16},
                "steps": 30,
            },
        ],
        **changes,
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def checkpoint(tmp_path: Path, name: str, **options) -> Path:
    """An untrained phnn's checkpoint folder: with no horizon, heavy ball with lr init_lr and momentum 0.9."""
    optimizer = make_optimizer("phnn", **options)
    return save_checkpoint(tmp_path / "checkpoints", 0, optimizer, optimizer.init_meta_params(0), name=name)


def test_benchmark_writes_a_row_per_task_and_optimizer_and_reuses_its_cache(tmp_path, capsys):
    suite, cache = tiny_suite(tmp_path), tmp_path / "cache"
    untrained = checkpoint(tmp_path, "untrained")
    scheduled = checkpoint(tmp_path, "scheduled", horizon=100)  # loaded with horizon = each task's steps
    args = [str(suite), "--cache-dir", str(cache), "--no-progress"]
    first = tmp_path / "first"
    assert cli.main(["benchmark", *args, "--optimizer", str(untrained), "--output", str(first)]) == 0
    assert capsys.readouterr().out.count("tuned 12 baselines in") == 2

    results = pq.read_table(first / "results.parquet").to_pandas()
    assert COLUMNS <= set(results.columns)
    optimizers = ["adam", "adamw", "sgd_momentum", str(untrained)]
    assert list(zip(results.task, results.optimizer)) == [(t, o) for t in ("iris", "wine") for o in optimizers]
    assert np.isfinite(results.final_loss).all() and (results.speedup > 0).all()
    best = results[results.optimizer == results.baseline]
    assert (best.loss_ratio == 1).all() and len(best) == 2
    report = (first / "results.md").read_text()
    assert "| learned optimizer | wins" in report and f"| {untrained} |" in report
    assert (first / "speedup.png").stat().st_size > 0

    # Every optimizer starts each run from the same parameters on the same minibatch.
    curves = pq.read_table(first / "curves.parquet").to_pandas()
    step0 = curves[curves.step == 0].groupby(["task", "run"]).loss
    assert (step0.max() - step0.min()).max() < 1e-6 and curves.optimizer.nunique() == 4

    cached = {path: path.stat().st_mtime_ns for path in cache.rglob("*.parquet")}
    second = tmp_path / "second"
    assert cli.main(["benchmark", *args, "--optimizer", f"scheduled={scheduled}", "--output", str(second)]) == 0
    out = capsys.readouterr().out
    assert out.count("baselines cached") == 2 and "baselines in" not in out
    assert {path: path.stat().st_mtime_ns for path in cache.rglob("*.parquet")} == cached
    again = pq.read_table(second / "results.parquet").to_pandas()
    assert set(again.optimizer) == {"adam", "adamw", "sgd_momentum", "scheduled"}
    baselines = ~results.optimizer.isin([str(untrained)])
    assert again[~again.learned].final_loss.tolist() == results[baselines].final_loss.tolist()


def test_a_learned_optimizer_sees_the_baselines_inits_and_minibatches(tmp_path):
    """Untrained phnn is heavy ball: on real modules it retraces the batched sgd_momentum baseline."""
    task = make_task(load_suite(tiny_suite(tmp_path)).tasks[1].task, "meta_test")
    seeds = optimizee_seeds(3, 2, "meta_test")
    learned = resolve_learned(str(checkpoint(tmp_path, "heavy_ball", init_lr=0.01, init_momentum=0.9)))
    baseline = Baseline("sgd_momentum", 0.01, "constant")
    [batched] = run_baselines(task, seeds, [baseline], BaselineGrid(momentum=0.9), steps=25)
    torch.testing.assert_close(run_learned(task, seeds, learned, steps=25), batched, rtol=1e-4, atol=1e-6)


def test_batched_baselines_equal_each_runs_own_torch_optimizer():
    task = ModuleTask(load_factory("metaopt.tasks.heldout:wine_mlp")(), batch_size=16, half="meta_test")
    seeds, steps, grid = [5, 7, 9], 15, BaselineGrid(weight_decay=0.05)
    configurations = [Baseline("adam", 0.03, "cosine"), Baseline("adamw", 0.01, "constant")]
    batched = run_baselines(task, seeds, configurations, grid, steps)
    optimizees = task.sample(seeds)
    for index, (kind, lr) in enumerate([("adam", 0.03), ("adamw", 0.01)]):
        for run, seed in enumerate(seeds):
            torch.manual_seed(seed)
            model = task.definition.model()
            if kind == "adam":
                optimizer = torch.optim.Adam(model.parameters(), lr=lr)
                scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
            else:
                optimizer, scheduler = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05), None
            for step in range(steps):
                batch = task.batch(optimizees, step)
                loss = task.definition.loss(model(batch["x"][run]), batch["y"][run])
                assert math.isclose(loss.item(), batched[index, run, step].item(), rel_tol=1e-4), (kind, run, step)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if scheduler:
                    scheduler.step()


def test_speedup_counts_the_steps_the_best_baseline_needs():
    steps, cap = 10, 4
    tuned = np.linspace(1.0, 0.1, steps)  # reaches 0.1 at its last step
    longer = np.linspace(1.0, 0.0, cap * steps)
    assert speedup(0.1, tuned, longer, steps, cap) == (1.0, False)  # as fast as the baseline
    assert speedup(0.5, tuned, longer, steps, cap) == (0.6, False)  # the baseline is there after 6 steps
    reached = int(np.flatnonzero(longer <= 0.05)[0]) + 1
    assert speedup(0.05, tuned, longer, steps, cap) == (reached / steps, False) and reached > steps
    assert speedup(-1.0, tuned, longer, steps, cap) == (4.0, True)  # never reached: the cap, flagged
    assert speedup(math.inf, tuned, longer, steps, cap) == (0.1, False)  # a diverged optimizer: reached at once


def test_the_speedup_plot_labels_its_axis_and_shows_every_value_one_included():
    """Speedups within one decade: the log axis still has labelled ticks besides 1; a speedup of exactly 1 (no
    bar) still has its dot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    results = pd.DataFrame(
        {
            "task": ["iris", "iris", "wine", "wine"],
            "optimizer": ["adam", "learned", "adam", "learned"],
            "speedup": [1.0, 1.6, 1.0, 0.7],
            "speedup_capped": [False, False, False, True],
        }
    )
    figure = speedup_figure(results, "two tasks")
    FigureCanvasAgg(figure).draw()
    [axes] = figure.axes
    low, high = axes.get_ylim()
    labels = [t.get_text() for t in axes.get_yticklabels() if t.get_text() and low <= t.get_position()[1] <= high]
    assert len(labels) >= 2 and "1" in labels, labels
    dots = np.concatenate([collection.get_offsets() for collection in axes.collections])
    assert sorted(map(tuple, dots.round(3).tolist())) == sorted([(-0.2, 1.0), (0.2, 1.6), (0.8, 1.0), (1.2, 0.7)])


def test_final_loss_averages_the_last_tenth_of_the_steps_and_scores_divergence_inf():
    losses = torch.tensor([[4.0] * 18 + [2.0, 1.0], [4.0] * 18 + [4.0, 3.0]], dtype=torch.float64)
    assert final_loss(losses, window=2) == pytest.approx((1.5 + 3.5) / 2)
    assert smoothed(np.array([1.0, 3.0, 5.0]), 2).tolist() == [1.0, 2.0, 4.0]
    spike = np.array([1.0, 1e20, 3.0, 0.5, 0.25])  # a run that blew up and came back (momentum SGD at lr 1)
    assert smoothed(spike, 2)[-2:].tolist() == [1.75, 0.375]
    losses[1, 7] = math.nan
    assert final_loss(losses, window=2) == math.inf


HELDOUT = [entry.task.factory for entry in load_suite(SHIPPED_SUITE).tasks]


def test_the_shipped_suite_covers_at_least_eight_tasks_and_a_long_run():
    suite = load_suite(SHIPPED_SUITE)
    assert len(suite.tasks) >= 8 and max(entry.steps for entry in suite.tasks) >= 1000


@pytest.mark.parametrize("factory", HELDOUT)
def test_each_heldout_task_builds_and_its_loss_falls_under_adam(factory):
    task = ModuleTask(load_factory(factory)(), batch_size=32, half="meta_test")
    [losses] = run_baselines(task, [1, 3], [Baseline("adam", 0.01, "constant")], BaselineGrid(), steps=30)
    assert torch.isfinite(losses).all()
    assert losses[:, -5:].mean() < 0.9 * losses[:, 0].mean(), losses.mean(0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"tasks": [{"name": "x", "task": {"kind": "module", "factory": "a.b:c"}, "steps": 5, "stepz": 1}]},
            "tasks[0].stepz: unknown field; allowed fields here: name, task, steps",
        ),
        (
            {"tasks": [{"name": "x", "task": {"kind": "module", "factory": "metaopt.tasks.heldout:nope"}, "steps": 5}]},
            "tasks[0].task.factory: task factory 'metaopt.tasks.heldout:nope': metaopt.tasks.heldout has no function",
        ),
        ({"baselines": {"kinds": ["adagrad"]}}, "baselines.kinds[0]: Input should be 'adam', 'adamw' or"),
        ({"runs": 0}, "runs: Input should be greater than or equal to 1"),
    ],
)
def test_a_bad_suite_is_one_error_naming_the_field(tmp_path, capsys, change, message):
    assert cli.main(["benchmark", str(tiny_suite(tmp_path, **change))]) == 2
    error = capsys.readouterr().err
    assert error.startswith("metaopt benchmark: error: invalid suite") and message in error


def test_a_missing_suite_or_a_bad_optimizer_source_is_named(tmp_path, capsys):
    assert cli.main(["benchmark", str(tmp_path / "missing.yaml")]) == 2
    assert f"suite file {tmp_path / 'missing.yaml'} does not exist" in capsys.readouterr().err
    suite, not_a_checkpoint = tiny_suite(tmp_path), tmp_path / "not_a_checkpoint"
    not_a_checkpoint.mkdir()
    for source, says in [(tmp_path / "nowhere", "is not a checkpoint folder"), (not_a_checkpoint, "has no spec.json")]:
        assert cli.main(["benchmark", str(suite), "--optimizer", str(source), "--no-progress"]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"metaopt benchmark: error: --optimizer {source}: ") and says in error
    learned = str(checkpoint(tmp_path, "phnn"))
    args = ["benchmark", str(suite), "--optimizer", f"adam={learned}", "--cache-dir", str(tmp_path), "--no-progress"]
    assert cli.main(args) == 2
    assert "must be unique and differ from the baselines' (adam)" in capsys.readouterr().err


def test_the_step_profile_records_each_runs_updates_and_norms_on_the_benchmarks_runs(tmp_path, capsys):
    suite, output = tiny_suite(tmp_path), tmp_path / "profile.parquet"
    heavy_ball = checkpoint(tmp_path, "heavy_ball", init_lr=0.01, init_momentum=0.9)
    args = [str(suite), "wine", "--optimizer", f"heavy_ball={heavy_ball}", "--output", str(output)]
    profile_steps.main([*args, "--baseline", "sgd_momentum:0.01:constant", "--baseline", "adam:0.1:cosine"])
    assert "| heavy_ball | 9 |" in capsys.readouterr().out
    steps = pd.read_parquet(output)
    assert len(steps) == 3 * 2 * 30 and set(steps.columns) >= {"optimizer", "run", "step", "loss", "update_rms", "norm"}
    by = {name: rows.sort_values(["run", "step"]).reset_index(drop=True) for name, rows in steps.groupby("optimizer")}
    for column in ("loss", "update_rms", "norm"):  # untrained phnn is heavy ball: the same runs, step by step
        np.testing.assert_allclose(by["heavy_ball"][column], by["sgd_momentum lr=0.01 constant"][column], rtol=1e-3)
    adam = by["adam lr=0.1 cosine"]
    assert adam[adam.step == 0].update_rms.tolist() == pytest.approx([0.1, 0.1], rel=1e-3)  # lr · sign(g) first
    assert adam[adam.step == 29].update_rms.max() < 1e-3  # the cosine schedule's last step


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["wine", "--baseline", "adam:0.3"], "--baseline 'adam:0.3': expected KIND:LR:SCHEDULE"),
        (["wine", "--baseline", "lion:0.3:constant"], "KIND one of adam, adamw, sgd_momentum"),
        (["iris_logistic"], "'iris_logistic' is not a task of .*: iris, wine"),
    ],
)
def test_the_step_profile_names_a_bad_argument(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit):
        profile_steps.main([str(tiny_suite(tmp_path)), *args])
    assert re.search(message, capsys.readouterr().err)
