"""Ray Tune searches: bad input fails before any trial, and tiny real searches on a real local Ray
cluster with a real MLflow server (ASHA, Optuna, PBT, a killed-then-resumed search)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient

import metaopt
from metaopt.cli import main
from metaopt.config import ConfigError
from metaopt.tune import load_search
from metaopt.tune.space import PBT_MUTABLE

pytestmark = pytest.mark.integration  # real Ray clusters or MLflow servers

TRAIN = {
    "task": {"kind": "quadratic", "dim": 6},
    "optimizer": {"kind": "phnn", "options": {"hidden": 4}},
    "train": {
        "meta_steps": 8,
        "unroll": 5,
        "episode_length": 20,
        "batch_size": 8,
        "meta_lr": 0.003,
        "eval_every": 2,
        "eval_runs": 8,
        "checkpoint_every": 4,
    },
    "tracking": {"experiment": "tune-tests"},
    "evaluate": {"steps": 20, "runs": 10, "optimizers": [{"kind": "adam", "lr": 0.1}]},
}


def write_search(folder: Path, search: dict | None = None, space: dict | None = None, **sections) -> Path:
    """A search YAML (and its base training config) in ``folder``."""
    (folder / "train.yaml").write_text(yaml.safe_dump(TRAIN))
    spec = {
        "base": "train.yaml",
        "search": {
            "samples": 4,
            "max_concurrent_trials": 2,
            "grace_period": 1,
            "compare_default": False,
            **(search or {}),
        },
        "space": {
            "optimizer.options.init_lr": {"choice": [0.01, 1e-6]},
            "optimizer.options.activation": {"choice": ["tanh", "relu"]},
        }
        if space is None
        else space,
        **sections,
    }
    path = folder / "tune.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"space": {}}, r"the search space is empty"),
        (
            {"space": {"optimizer.options.hiden": {"choice": [4, 8]}}},
            r"space\.optimizer\.options\.hiden = 4 is not a valid value:\n"
            r".*unknown option\(s\) hiden for optimizer 'phnn'",
        ),
        (
            {
                "space": {"train.estimator.kind": {"choice": ["tbptt", "es"]}},
                "set": {"train.estimator.second_order": True},
            },
            r"space\.train\.estimator\.kind = 'es' is not a valid value:\n.*second_order applies to kind: tbptt only",
        ),
        ({"space": {"train.meta_lr": {"loguniform": [0.01, 0.001]}}}, r"loguniform needs low < high"),
        (
            {"space": {"train.unroll": {"choice": [5, 40]}}},
            r"train\.unroll = 40 is not a valid value:\n.*must not exceed",
        ),
        ({"space": {"train.unroll": {"range": [5, 10]}}}, r"expected one of \{choice: \.\.\.\}"),
        (
            {"space": {"train.unroll": {"choice": [5, 20]}, "train.episode_length": {"choice": [20, 10]}}},
            r"every parameter at its highest value .* makes the config invalid:\n.*unroll \(20\) must not exceed "
            r"episode_length \(10\)",
        ),
        ({"search": {"scheduler": "pbt"}}, r"pbt needs a pbt section"),
        (
            {"search": {"scheduler": "pbt"}, "pbt": {"mutations": {"optimizer.options.hidden": {"choice": [4, 8]}}}},
            r"PBT can only change what may change mid-run",
        ),
        (
            {
                "search": {"searcher": "optuna", "scheduler": "pbt"},
                "pbt": {"mutations": {"train.meta_lr": {"choice": [0.1]}}},
            },
            r"pbt explores by itself",
        ),
    ],
)
def test_bad_searches_fail_before_any_trial_with_what_to_change(tmp_path, change, message):
    path = write_search(tmp_path, change.pop("search", None), change.pop("space", None))
    spec = yaml.safe_load(path.read_text())
    spec.update(change)
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=message):
        load_search(path)


def test_pbt_mutates_only_what_can_change_mid_run():
    assert set(PBT_MUTABLE) == {"train.meta_lr", "train.unroll", "train.grad_clip"}


def tune_args(path, address: str, folder_option: str, folder) -> list[str]:
    """``metaopt tune`` on ``path`` at ``address`` with ``--output`` or ``--resume`` ``folder``, untracked, quiet."""
    return ["tune", str(path), "--address", address, folder_option, str(folder), "--no-tracking", "--no-progress"]


def test_a_trial_the_cluster_cannot_host_fails_before_any_trial(ray_cluster, tmp_path, capsys):
    path = write_search(tmp_path)
    spec = yaml.safe_load(path.read_text())
    spec["set"] = {"distributed": {"workers": 2, "num_cpus": 1}}  # + the learner's CPU: 3 > 2
    path.write_text(yaml.safe_dump(spec))
    code = main(tune_args(path, ray_cluster.address, "--output", tmp_path / "search"))
    assert code == 2
    assert (
        "one trial needs 3 CPU (search.trial_cpus + distributed.workers 2 × num_cpus 1.0) but the Ray cluster "
        "has 2" in capsys.readouterr().err
    )
    assert not list((tmp_path / "search").glob("meta_train_trial_*"))


def child_runs(uri: str, parent_run_id: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tune-tests")
    return client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")


def test_tiny_asha_search_tracks_trials_and_registers_the_best(ray_cluster, mlflow_server, tmp_path, capsys):
    # Seed 11 samples init_lr 0.01, 0.01, 1e-6, 0.01: the third trial starts only when one of the first two
    # has finished every rung, so ASHA always has a better result to stop the slow one (1e-6) against.
    path = write_search(
        tmp_path, {"seed": 11, "compare_default": True}, space={"optimizer.options.init_lr": {"choice": [0.01, 1e-6]}}
    )
    folder = tmp_path / "search"
    code = main(
        [
            "tune",
            str(path),
            "--address",
            ray_cluster.address,
            "--tracking-uri",
            mlflow_server.uri,
            "--register",
            "tiny-tuned",
            "--output",
            str(folder),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    results = pd.read_parquet(folder / "results.parquet")
    assert len(results) == 4 and set(results["status"]) <= {"completed", "stopped early"}
    assert (results["status"] == "stopped early").any(), results  # ASHA stopped some
    assert (results["status"] == "completed").any()
    assert results["heldout_loss"].iloc[0] == results["heldout_loss"].min()
    assert results["optimizer.options.init_lr"].iloc[0] == 0.01
    assert "phnn (tuned)" in out and "phnn (default architecture)" in out and "| adam |" in out

    parent_id = next(line.split()[3] for line in out.splitlines() if line.startswith("MLflow: search run"))
    client = MlflowClient(mlflow_server.uri)
    parent = client.get_run(parent_id)
    assert parent.data.params["search.samples"] == "4"
    assert {a.path for a in client.list_artifacts(parent_id)} >= {"results.parquet", "results.md", "evaluation"}
    children = child_runs(mlflow_server.uri, parent_id)
    assert len(children) == 4
    for child in children:
        assert child.data.params["optimizer.kind"] == "phnn" and "optimizer.options.init_lr" in child.data.params
        assert [m.step for m in client.get_metric_history(child.info.run_id, "heldout_loss")][:1] == [2]

    version = client.get_model_version_by_alias("tiny-tuned", "candidate")
    assert version.run_id in {c.info.run_id for c in children}
    assert float(version.tags["heldout_loss"]) == pytest.approx(results["heldout_loss"].min())

    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server.uri
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 1)
        optimizer = metaopt.load_optimizer("models:/tiny-tuned@candidate", model.parameters())
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    x = torch.randn(64, 5)
    y = x @ torch.randn(5, 1)  # learnable: the loss can go to zero
    losses = []
    for _ in range(50):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_a_trial_restored_at_its_end_reports_that_end_itself(tmp_path, monkeypatch):
    """PBT may hand a trial the last checkpoint of a trial that has finished (so nothing is left to
    train). Tune then keeps the donor's last result as the trial's unless the trial reports: the search
    table showed the donor's trial id and the trial "stopped early". That timing cannot be forced in a
    real search, so Tune's session functions are stood in for here; the checkpoint and training are real."""
    from ray import tune

    from metaopt.meta import MetaTrainer
    from metaopt.tune.trainable import meta_train_trial

    space = load_search(write_search(tmp_path))
    sample = {"optimizer.options.init_lr": 0.01, "optimizer.options.activation": "tanh"}
    donor = MetaTrainer(space.trial_config(sample), tmp_path / "donor")
    final = donor.train(show_progress=False)
    reports = []
    monkeypatch.setattr(tune, "get_checkpoint", lambda: tune.Checkpoint.from_directory(final))
    monkeypatch.setattr(tune, "get_context", lambda: type("Context", (), {"get_trial_dir": lambda _: str(tmp_path)})())
    monkeypatch.setattr(tune, "report", lambda metrics, checkpoint: reports.append((metrics, checkpoint)))

    meta_train_trial(sample, space)
    assert len(reports) == 1
    metrics, checkpoint = reports[0]
    assert metrics["meta_step"] == TRAIN["train"]["meta_steps"]
    assert metrics["heldout_loss"] == pytest.approx(donor.history[-1]["heldout_loss"], rel=1e-6)
    assert (Path(checkpoint.path) / "spec.json").exists()  # a checkpoint Tune can hand on


@pytest.mark.parametrize("searcher", ["optuna", "pbt"])
def test_optuna_and_pbt_searches_run_for_real(ray_cluster, tmp_path, searcher):
    if searcher == "optuna":
        path = write_search(tmp_path, {"samples": 2, "searcher": "optuna", "scheduler": "fifo"})
    else:
        # PBT exploits only while both trials run (it ignores finished ones): long enough that the trials,
        # started a few seconds apart, overlap for several perturbation points (at 40 meta-steps, 1 of 8
        # runs had none).
        path = write_search(
            tmp_path,
            {"samples": 2, "scheduler": "pbt"},
            space={},
            set={"train.meta_steps": 80},
            pbt={
                "perturbation_interval": 4,
                "mutations": {"train.meta_lr": {"loguniform": [0.0001, 0.01]}, "train.unroll": {"choice": [4, 5]}},
            },
        )
    folder = tmp_path / "search"
    assert main(tune_args(path, ray_cluster.address, "--output", folder)) == 0
    results = pd.read_parquet(folder / "results.parquet")
    assert len(results) == 2 and (results["status"] == "completed").all(), results
    if searcher == "pbt":  # PBT restarted a trial from the other's checkpoint with new meta-hyperparameters
        policy = (folder / "pbt_global.txt").read_text().splitlines() if (folder / "pbt_global.txt").exists() else []
        assert policy, "PBT never exploited a checkpoint"
        old, new = json.loads(policy[0])[-2:]
        assert (old["train.meta_lr"], old["train.unroll"]) != (new["train.meta_lr"], new["train.unroll"])
        assert all(json.loads(line)[-1]["train.unroll"] in (4, 5) for line in policy)  # choices stay choices


def test_a_killed_search_resumes_from_its_checkpoints(ray_cluster, tmp_path):
    path = write_search(
        tmp_path,
        {"samples": 2, "scheduler": "fifo", "max_concurrent_trials": 1},
        space={"optimizer.options.activation": {"choice": ["tanh", "relu"]}},
    )
    spec = yaml.safe_load(path.read_text())
    spec["set"] = {"train.meta_steps": 300, "train.eval_every": 10}
    path.write_text(yaml.safe_dump(spec))
    folder = tmp_path / "search"
    command = [sys.executable, "-m", "metaopt.cli", *tune_args(path, ray_cluster.address, "--output", folder)]
    # Tune snapshots the experiment at most this often (default: adaptive, tens of seconds).
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    search = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 180
        while not (checkpointed := list(folder.glob("meta_train_trial_*/checkpoint_000002"))):
            assert search.poll() is None and time.monotonic() < deadline, "the search ended before it was killed"
            time.sleep(0.2)
        time.sleep(2)  # let Tune snapshot the experiment with those checkpoints
    finally:
        os.killpg(search.pid, signal.SIGKILL)  # the driver dies outright; Ray ends its trials
        search.wait()
    killed_at = time.time()

    assert main(tune_args(path, ray_cluster.address, "--resume", folder)) == 0
    results = pd.read_parquet(folder / "results.parquet")
    assert len(results) == 2 and (results["status"] == "completed").all(), results
    progress = [json.loads(line) for line in (checkpointed[0].parent / "result.json").read_text().splitlines()]
    after = [row["meta_step"] for row in progress if row["timestamp"] > killed_at]
    assert min(after) > 30, "the resumed trial started over instead of from its checkpoint"
