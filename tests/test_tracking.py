"""MLflow tracking, the model registry and load_optimizer against a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, TINY_TRAIN
from mlflow import MlflowClient
from torch import nn

import metaopt
from metaopt.cli import main as metaopt_main
from metaopt.config import validate_config
from metaopt.meta import MetaTrainer
from metaopt.tracking import RegistryError, RunTracker
from metaopt.tracking.registry import resolve_checkpoint

pytestmark = pytest.mark.integration  # real Ray clusters or MLflow servers


@pytest.fixture(autouse=True)
def fresh_mlflow_globals(monkeypatch, tmp_path):
    """Each test picks its own tracking URI and a cache of its own for what it loads; none leaks into the
    next through MLflow's globals."""
    monkeypatch.setenv("METAOPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    monkeypatch.setattr(mlflow.tracking._model_registry.utils, "_registry_uri", None)


def train_cli(*args: str) -> int:
    config = str(REPO_ROOT / "jobs/configs/train_quadratic_phnn.yaml")
    return metaopt_main(["train", config, "--set", "distributed=null", *TINY_TRAIN, *args])


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 40) -> list[float]:
    torch.manual_seed(1)
    x = torch.randn(256, 10)
    y = x @ torch.randn(10, 1) + 0.1 * torch.randn(256, 1)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def test_a_tracked_run_is_registered_promoted_pulled_and_trains_a_torch_model(mlflow_server, tmp_path, capsys):
    uri = mlflow_server.uri
    assert train_cli("--output", str(tmp_path / "run"), "--tracking-uri", uri, "--register", "tiny-phnn") == 0
    out = capsys.readouterr().out
    assert "registered tiny-phnn version" in out and "metaopt.load_optimizer('models:/tiny-phnn@latest'" in out
    assert f"at {uri}, meta-trained on quadratic" in out and f"tracking_uri={uri!r}" in out
    assert "for your own models, start from the optimizer meta-trained on a task mixture" in out  # not quadratics

    client = MlflowClient(uri)
    run_id = (tmp_path / "run" / "mlflow_run.json").read_text().split('"run_id": "')[1].split('"')[0]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.meta_steps"] == "4" and run.data.params["optimizer.kind"] == "phnn"
    assert run.data.tags["metaopt.version"] == metaopt.__version__ and "mlflow.source.git.commit" in run.data.tags
    assert [m.step for m in client.get_metric_history(run_id, "meta_loss")] == [1, 2, 3, 4]
    assert len(client.get_metric_history(run_id, "heldout_loss")) == 2
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for folder in ("checkpoints", "evaluation") for a in client.list_artifacts(run_id, folder)
    }
    assert {
        "metrics.parquet",
        "config.yaml",
        "checkpoints/best",
        "evaluation/table.md",
        "evaluation/curves.png",
    } <= artifacts

    version = client.get_model_version("tiny-phnn", "1")
    assert version.tags["task"] == "quadratic" and float(version.tags["heldout_loss"]) > 0

    assert metaopt_main(["registry", "--tracking-uri", uri, "promote", "tiny-phnn", "1", "candidate"]) == 0
    assert metaopt_main(["registry", "--tracking-uri", uri, "show", "tiny-phnn"]) == 0
    assert "| 1 | @candidate | quadratic |" in capsys.readouterr().out
    assert metaopt_main(["registry", "--tracking-uri", uri, "show", "nosuch"]) == 2
    shown = capsys.readouterr()
    assert shown.out == "" and "no registered model 'nosuch'" in shown.err  # the error alone, no table header
    assert (
        metaopt_main(["registry", "--tracking-uri", uri, "pull", "tiny-phnn@candidate", str(tmp_path / "pulled")]) == 0
    )
    assert (tmp_path / "pulled" / "optimizer.safetensors").exists()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
    optimizer = metaopt.load_optimizer("models:/tiny-phnn@candidate", model.parameters(), tracking_uri=uri)
    losses = fit(model, optimizer)
    assert losses[-1] < 0.5 * losses[0]

    # MLflow's own API: the registered model is a pyfunc mapping gradients and state to updates.
    mlflow.set_tracking_uri(uri)
    pyfunc = mlflow.pyfunc.load_model("models:/tiny-phnn@candidate")
    grads = [1.0, -2.0, 0.5]
    (first,) = pyfunc.predict([{"grads": grads}])
    (second,) = pyfunc.predict([{"grads": grads, "state": first.state, "step": 1}])
    assert len(first.updates) == 3 and np.all(np.sign(first.updates) == -np.sign(grads))
    assert not np.allclose(first.updates, second.updates)  # the state (momentum) carries over


def test_state_dict_of_a_registered_optimizer_resumes_a_users_training(mlflow_server, tmp_path):
    uri = mlflow_server.uri
    assert train_cli("--output", str(tmp_path / "run"), "--tracking-uri", uri, "--register", "resume-phnn") == 0

    def fresh():
        torch.manual_seed(0)
        model = nn.Linear(10, 1)
        return model, metaopt.load_optimizer("models:/resume-phnn/1", model.parameters(), tracking_uri=uri)

    straight_model, straight = fresh()
    expected = fit(straight_model, straight, steps=20)[10:]
    model, optimizer = fresh()
    fit(model, optimizer, steps=10)
    saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    torch.save(saved, tmp_path / "user.pt")
    loaded = torch.load(tmp_path / "user.pt", weights_only=True)
    model, optimizer = fresh()
    model.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    assert fit(model, optimizer, steps=10) == expected  # fit draws the same data every call


def test_unknown_names_aliases_and_non_optimizers_fail_clearly(mlflow_server, tmp_path):
    uri = mlflow_server.uri
    assert train_cli("--output", str(tmp_path / "run"), "--tracking-uri", uri, "--register", "named-phnn") == 0
    params = nn.Linear(2, 1).parameters()
    with pytest.raises(RegistryError, match="no registered model 'nope'.*registered: .*named-phnn"):
        metaopt.load_optimizer("models:/nope@latest", params, tracking_uri=uri)
    with pytest.raises(RegistryError, match="has no alias 'prod'"):
        metaopt.load_optimizer("models:/named-phnn@prod", params, tracking_uri=uri)
    with pytest.raises(RegistryError, match="has no version 9; versions: 1"):
        metaopt.load_optimizer("models:/named-phnn/9", params, tracking_uri=uri)
    run_id = MlflowClient(uri).get_model_version("named-phnn", "1").run_id
    with pytest.raises(RegistryError, match="is not a metaopt optimizer"):
        resolve_checkpoint(f"runs:/{run_id}/evaluation", tracking_uri=uri)


def test_the_embedded_sqlite_store_needs_no_server(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert train_cli("--output", str(tmp_path / "run"), "--register", "local-phnn") == 0
    assert (tmp_path / "mlflow.db").exists() and (tmp_path / "mlruns").is_dir()
    assert "mlflow ui --backend-store-uri sqlite:///" in capsys.readouterr().out
    model = nn.Linear(10, 1)
    losses = fit(model, metaopt.load_optimizer("models:/local-phnn@latest", model.parameters()))
    assert losses[-1] < losses[0]


def test_a_server_that_goes_down_mid_run_loses_nothing(mlflow_server, tmp_path):
    """Stops the real mlflow server by PID mid-run, restarts it, and replays the buffered writes."""
    server = mlflow_server
    config = validate_config(
        {
            "task": {"kind": "quadratic"},
            "optimizer": {"kind": "phnn"},
            "device": "cpu",
            "train": {
                "meta_steps": 8,
                "unroll": 5,
                "episode_length": 10,
                "batch_size": 4,
                "eval_every": 4,
                "eval_runs": 4,
                "checkpoint_every": 2,
            },
        }
    )
    run_dir = tmp_path / "run"
    try:
        tracker = RunTracker(run_dir, server.uri)
        trainer = MetaTrainer(config, run_dir)

        def sink(meta_step: int, metrics: dict) -> None:
            tracker.log_metrics(meta_step, metrics)
            if meta_step == 3:
                server.stop()

        with pytest.warns(UserWarning, match="is unreachable.*training continues"):
            trainer.train(show_progress=False, on_metrics=sink)
        tracker.finish()
        assert trainer.meta_step == 8 and (run_dir / "checkpoints" / "meta_step_000008").exists()
        assert tracker.buffered == 6  # metrics of meta-steps 4-8 and the end of the run

        server.start()  # same port, same store
        with pytest.warns(UserWarning, match="is reachable again: delivered 6 buffered write"):
            assert metaopt_main(["sync", str(run_dir)]) == 0
        assert not (run_dir / "mlflow_buffer.jsonl").exists()
        client = MlflowClient(server.uri)
        assert [m.step for m in client.get_metric_history(tracker.run_id, "meta_loss")] == list(range(1, 9))
        assert client.get_run(tracker.run_id).info.status == "FINISHED"
    finally:
        if server.process is None:  # the session's server: up again for the tests after this one
            server.start()


def test_a_refused_write_is_skipped_and_never_blocks_later_ones(tmp_path):
    """A resumed run continues its MLflow run; a param changed on resume is refused by the store."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = RunTracker(tmp_path / "run", uri)
    first.log_params({"train.meta_lr": "0.001"})
    first.finish()
    resumed = RunTracker(tmp_path / "run", uri)
    with pytest.warns(UserWarning, match="MLflow refused a params write"):
        resumed.log_params({"train.meta_lr": "0.003"})
    resumed.log_metrics(7, {"meta_loss": 0.5})
    resumed.finish()
    assert resumed.run_id == first.run_id and resumed.buffered == 0
    run = MlflowClient(uri).get_run(first.run_id)
    assert run.data.params["train.meta_lr"] == "0.001" and run.data.metrics["meta_loss"] == 0.5
