"""The evaluation harness end to end, through the CLI, on small real configs."""

import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from metaopt.cli import main
from metaopt.config import OptimizerConfig
from metaopt.evaluate import Candidate, candidate_for, compare
from metaopt.meta.checkpoint import save_checkpoint
from metaopt.optimizers import make_optimizer
from metaopt.tasks import Quadratic


def write_config(tmp_path, task, optimizers, steps=12, runs=5):
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "task": task,
                "evaluate": {"steps": steps, "runs": runs, "seed": 3, "sweep_runs": 4, "optimizers": optimizers},
            }
        )
    )
    return path


@pytest.mark.parametrize("task_name", ["quadratic", "mnist"])
def test_evaluate_cli_writes_every_output(tmp_path, capsys, task_name, request):
    task = {"kind": "quadratic"} if task_name == "quadratic" else request.getfixturevalue("mnist_task")
    optimizers = [
        {"kind": "adam", "lr": 0.03},
        {"kind": "momentum", "lr": 0.01},
        {"kind": "sgd", "lr_sweep": [0.001, 0.01]},
    ]
    output = tmp_path / "out"
    assert (
        main(["evaluate", str(write_config(tmp_path, task, optimizers)), "--output", str(output), "--no-progress"]) == 0
    )

    curves = pq.read_table(output / "curves.parquet").to_pandas()
    assert list(curves.columns) == ["optimizer", "run", "step", "loss"]
    assert len(curves) == 3 * 5 * 13  # optimizers × runs × (steps + initial)
    summary = pq.read_table(output / "summary.parquet").to_pandas()
    assert list(summary["optimizer"]) == ["adam", "momentum", "sgd"]
    assert summary.loc[2, "lr"] in (0.001, 0.01)
    final = curves[curves.step == 12].groupby("optimizer")["loss"].mean()
    assert final["adam"] == pytest.approx(summary.set_index("optimizer").loc["adam", "final_loss_mean"])

    table = (output / "table.md").read_text()
    for name in ("adam", "momentum", "sgd"):
        assert f"| {name} |" in table
    assert (output / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| adam |" in printed and str(output) in printed


def test_same_optimizees_for_every_optimizer_and_seeded():
    family = Quadratic()
    candidates = [
        Candidate("a", lambda lr: make_optimizer("sgd", lr=lr), lr=0.01),
        Candidate("b", lambda lr: make_optimizer("sgd", lr=lr), lr=0.01),
    ]
    first = compare(candidates, family, steps=5, runs=3, seed=1, show_progress=False)
    assert torch.equal(first[0].losses, first[1].losses)
    again = compare(candidates, family, steps=5, runs=3, seed=1, show_progress=False)
    assert torch.equal(first[0].losses, again[0].losses)
    other = compare(candidates, family, steps=5, runs=3, seed=2, show_progress=False)
    assert not torch.equal(first[0].losses, other[0].losses)


def test_a_checkpoints_learned_schedule_is_stretched_over_the_evaluation(tmp_path):
    trained = make_optimizer("phnn", init_lr=0.05, horizon=10)
    folder = save_checkpoint(tmp_path, 0, trained, trained.init_meta_params(0))
    stretched = candidate_for(OptimizerConfig(checkpoint=str(folder)), torch.device("cpu"), steps=24)
    as_trained = candidate_for(OptimizerConfig(checkpoint=str(folder)), torch.device("cpu"), steps=10)
    assert (stretched.build(None).horizon, as_trained.build(None).horizon) == (24, 10)
    direct = make_optimizer("phnn", init_lr=0.05, horizon=24)
    candidates = [stretched, Candidate("direct", lambda lr: direct, meta_params=direct.init_meta_params(0))]
    results = compare(candidates, Quadratic(), steps=24, runs=3, seed=1, show_progress=False)
    torch.testing.assert_close(results[0].losses, results[1].losses)


def test_lr_sweep_keeps_the_best_rate_on_meta_train_optimizees():
    family = Quadratic()
    sweep = [1e-5, 0.01, 10.0]  # too small, good, divergent
    [result] = compare(
        [Candidate("sgd", lambda lr: make_optimizer("sgd", lr=lr), lr_sweep=sweep)],
        family,
        steps=30,
        runs=4,
        seed=0,
        tuning_family=family,
        sweep_runs=4,
        show_progress=False,
    )
    assert result.optimizer.lr == 0.01
    assert result.sweep_scores[10.0] == float("inf")  # diverged runs score infinitely badly
    assert result.sweep_scores[0.01] < result.sweep_scores[1e-5]


def test_diverging_optimizer_is_reported_not_fatal(tmp_path):
    output = tmp_path / "out"
    path = write_config(tmp_path, {"kind": "quadratic"}, [{"kind": "sgd", "lr": 10.0}], steps=40)
    assert main(["evaluate", str(path), "--output", str(output), "--no-progress"]) == 0
    assert "| sgd | 10 | diverged |" in (output / "table.md").read_text()


def test_bad_config_and_missing_data_exit_2_with_message(tmp_path, capsys):
    path = write_config(tmp_path, {"kind": "quadratic", "dim": 0}, [{"kind": "adam", "lr": 0.1}])
    assert main(["evaluate", str(path), "--output", str(tmp_path / "o")]) == 2
    assert "task.dim: Input should be greater than or equal to 1" in capsys.readouterr().err
    missing = {"kind": "mnist_mlp", "data": {"root": str(tmp_path / "nodata"), "split": "train", "download": False}}
    path = write_config(tmp_path, missing, [{"kind": "adam", "lr": 0.1}])
    assert main(["evaluate", str(path), "--output", str(tmp_path / "o")]) == 2
    assert str(tmp_path / "nodata") in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing started


def test_metaopt_help_lists_commands():
    result = subprocess.run([sys.executable, "-m", "metaopt.cli", "--help"], capture_output=True, text=True, check=True)
    assert "evaluate" in result.stdout and "usage: metaopt" in result.stdout
