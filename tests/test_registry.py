"""The registry against real `mlflow server`s on 127.0.0.1: a server that does not answer, the load cache,
a password-protected server, and weights that do not match their registered SHA-256."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

import mlflow
import pytest
import torch
from conftest import MlflowServer
from mlflow import MlflowClient
from safetensors.torch import load_file, save_file
from test_tracking import fit, fresh_mlflow_globals, train_cli  # noqa: F401 - fresh_mlflow_globals: autouse
from torch import nn

import metaopt
from metaopt.benchmark import resolve_learned
from metaopt.cli import main as metaopt_main
from metaopt.meta.checkpoint import WEIGHTS, CheckpointError, save_checkpoint
from metaopt.optimizers import make_optimizer
from metaopt.tracking import RegistryError
from metaopt.tracking.registry import DIGEST_TAG, cache_root, resolve_checkpoint, weights_sha256
from metaopt.tracking.tracker import HTTP_DEFAULTS

pytestmark = pytest.mark.integration  # real Ray clusters or MLflow servers


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def silent_port():
    """A port on 127.0.0.1 whose server accepts every connection and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    held, stop = [], threading.Event()

    def hold() -> None:
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                pass

    thread = threading.Thread(target=hold)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for connection in held:
        connection.close()
    server.close()


def entries() -> list:
    """The cached checkpoints (the cache of this test: METAOPT_CACHE_DIR is the test's own)."""
    return sorted(path for path in cache_root().glob("*/*") if not path.name.startswith("."))


def negate(weights_file) -> None:
    """Replace a safetensors file by another valid one: the same tensors, negated."""
    save_file({name: -tensor for name, tensor in load_file(weights_file).items()}, str(weights_file))


@pytest.fixture
def busy_machine():
    """Every core kept busy by a process of its own (stopped by PID afterwards): a loaded machine."""
    burners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(len(os.sched_getaffinity(0)))
    ]
    yield
    for burner in burners:
        burner.kill()
        burner.wait()


@pytest.mark.parametrize("port", ["closed_port", "silent_port"])
def test_a_server_that_does_not_answer_fails_fast_however_loaded_the_machine(port, request, busy_machine, monkeypatch):
    """With metaopt's bounded HTTP retries and its deadline for the whole load (MLflow's own retries wait
    minutes): a refused connection, and one that is accepted and never answered, with every core busy."""
    for key in HTTP_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    uri = f"http://127.0.0.1:{request.getfixturevalue(port)}"
    start = time.monotonic()
    with pytest.raises(
        RegistryError,
        match=f"server at {re.escape(uri)} (cannot be reached|did not answer within 2[56] s).*is running.*"
        "MLFLOW_TRACKING_URI",
    ):
        metaopt.load_optimizer("models:/any-phnn@production", nn.Linear(2, 1).parameters(), tracking_uri=uri)
    assert time.monotonic() - start < 30


def test_a_tracking_uri_given_by_hand_is_the_registry_of_every_read(mlflow_server, tmp_path, monkeypatch, capsys):
    """load_optimizer(tracking_uri=...), `registry --tracking-uri ... pull` and benchmark's sources, in a process
    whose MLflow globals are unset: all of it from the server named, nothing from the default store (no
    mlflow.db appears in the working folder)."""
    uri = mlflow_server.uri
    register = ["registry", "--tracking-uri", uri, "register", "pretrained:general", "by-hand", "--alias", "prod"]
    assert metaopt_main(register) == 0
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)  # as in a new process
    monkeypatch.setattr(mlflow.tracking._model_registry.utils, "_registry_uri", None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.chdir(tmp_path)

    def fresh_cache(name: str) -> None:  # nothing cached: every source below is downloaded
        monkeypatch.setenv("METAOPT_CACHE_DIR", str(tmp_path / name))

    fresh_cache("load")
    metaopt.load_optimizer("models:/by-hand@prod", nn.Linear(2, 1).parameters(), tracking_uri=uri)
    fresh_cache("pull")
    assert metaopt_main(["registry", "--tracking-uri", uri, "pull", "by-hand@prod", "pulled"]) == 0
    fresh_cache("benchmark")
    assert resolve_learned("models:/by-hand/1", uri).folder.is_dir()
    assert (tmp_path / "pulled" / WEIGHTS).is_file()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_the_registry_commands_fail_fast_without_a_server(closed_port, tmp_path, monkeypatch, capsys):
    uri = f"http://127.0.0.1:{closed_port}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")  # set by the user: kept
    for action in (
        ["list"],
        ["show", "any-phnn"],
        ["promote", "any-phnn", "1", "production"],
        ["pull", "any-phnn@production", str(tmp_path / "pulled")],
        ["register", "0" * 32, "any-phnn"],
    ):
        assert metaopt_main(["registry", "--tracking-uri", uri, *action]) == 2
        assert f"server at {uri} cannot be reached" in capsys.readouterr().err
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"


def logged_run(uri: str, folder) -> str:
    """A run holding a phnn checkpoint as ``checkpoints/best``, as meta-training logs it (untrained: quicker)."""
    optimizer = make_optimizer("phnn")
    best = save_checkpoint(folder / "checkpoints", 0, optimizer, optimizer.init_meta_params(0), name="best")
    client = MlflowClient(uri)
    run_id = client.create_run("0").info.run_id  # MLflow's Default experiment
    client.log_artifacts(run_id, str(best), "checkpoints/best")
    return run_id


def test_loads_are_cached_by_version_verified_every_time_and_leave_no_temporary_folders(
    mlflow_server, tmp_path, monkeypatch
):
    uri = mlflow_server.uri
    run_id = logged_run(uri, tmp_path)
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # torch's own, kept on purpose
    assert metaopt_main(["registry", "--tracking-uri", uri, "register", run_id, "cached-phnn"]) == 0
    digest = MlflowClient(uri).get_model_version("cached-phnn", "1").tags[DIGEST_TAG]
    best = tmp_path / "checkpoints" / "best"
    assert digest == weights_sha256(best) == json.loads((best / "spec.json").read_text())["sha256"]

    params = list(nn.Linear(10, 1).parameters())
    metaopt.load_optimizer("models:/cached-phnn@latest", params, tracking_uri=uri)
    [entry] = entries()
    downloaded = (entry / WEIGHTS).stat()
    metaopt.load_optimizer("models:/cached-phnn@latest", params, tracking_uri=uri)
    assert entries() == [entry] and (entry / WEIGHTS).stat().st_ino == downloaded.st_ino  # not downloaded again
    assert json.loads((entry / "spec.json").read_text())["sha256"] == digest
    assert list(temp.iterdir()) == []

    negate(entry / WEIGHTS)  # the cached copy altered: refused, by alias (checked against the tag) and by version
    altered = weights_sha256(entry)
    for source in ("models:/cached-phnn@latest", "models:/cached-phnn/1"):
        with pytest.raises(
            CheckpointError,
            match=f"cached copy of models:/cached-phnn/1: {WEIGHTS} does not match "
            f"its registered SHA-256 \\(expected {digest}, found {altered}\\)",
        ):
            metaopt.load_optimizer(source, params, tracking_uri=uri)

    # The weights altered in the server's artifact store: a second version, its file replaced.
    assert metaopt_main(["registry", "--tracking-uri", uri, "register", run_id, "cached-phnn"]) == 0
    model_id = MlflowClient(uri).get_model_version("cached-phnn", "2").source.removeprefix("models:/")
    [stored] = [p for p in (mlflow_server.root / "artifacts").rglob(WEIGHTS) if model_id in p.parts]
    negate(stored)
    with pytest.raises(
        CheckpointError,
        match=f"models:/cached-phnn/2 at {uri}: .*expected {digest}, found {weights_sha256(stored.parent)}",
    ):
        metaopt.load_optimizer("models:/cached-phnn/2", params, tracking_uri=uri)
    assert entries() == [entry] and list(temp.iterdir()) == []  # nothing cached, nothing left behind


def test_a_password_protected_server_takes_runs_and_loads_with_credentials_only(tmp_path, monkeypatch, capsys):
    """MLflow's basic-auth app; afterwards, with the server stopped, a cached version loads and an alias fails."""
    (tmp_path / "mlflow").mkdir()
    server = MlflowServer(tmp_path / "mlflow", password=f"metaopt-{os.urandom(8).hex()}")
    server.start()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", server.ADMIN)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", server.password)
        assert train_cli("--output", str(tmp_path / "run"), "--tracking-uri", server.uri, "--register", "guarded") == 0
        assert "registered guarded version 1" in capsys.readouterr().out
        model = nn.Linear(10, 1)
        losses = fit(
            model, metaopt.load_optimizer("models:/guarded@latest", model.parameters(), tracking_uri=server.uri)
        )
        assert losses[-1] < losses[0]

        refused = (
            f"server at {re.escape(server.uri)} refused authentication \\(%s\\); set MLFLOW_TRACKING_USERNAME "
            "and MLFLOW_TRACKING_PASSWORD"
        )
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
        with pytest.raises(RegistryError, match=refused % "user 'admin': wrong password, or no such user"):
            metaopt.load_optimizer("models:/guarded@latest", model.parameters(), tracking_uri=server.uri)
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
        with pytest.raises(RegistryError, match=refused % "no credentials given"):
            metaopt.load_optimizer("models:/guarded@latest", model.parameters(), tracking_uri=server.uri)
        assert metaopt_main(["registry", "--tracking-uri", server.uri, "list"]) == 2
        assert "refused authentication (no credentials given)" in capsys.readouterr().err

        server.stop()
        metaopt.load_optimizer("models:/guarded/1", model.parameters(), tracking_uri=server.uri)  # from the cache
        with pytest.raises(RegistryError, match="cannot be reached"):
            metaopt.load_optimizer("models:/guarded@latest", model.parameters(), tracking_uri=server.uri)
    finally:
        server.stop()


def test_the_shipped_optimizer_registers_with_one_command_and_loads_from_the_registry(mlflow_server, tmp_path, capsys):
    uri = mlflow_server.uri
    command = ["registry", "--tracking-uri", uri, "register", "pretrained:general", "general", "--alias", "production"]
    assert metaopt_main(command) == 0
    assert "registered general version 1 as @production" in capsys.readouterr().out
    client = MlflowClient(uri)
    version = client.get_model_version_by_alias("general", "production")
    shipped = resolve_checkpoint("pretrained:general")
    assert version.tags["source"] == "pretrained:general" and version.tags[DIGEST_TAG] == weights_sha256(shipped)
    assert metaopt_main(["registry", "--tracking-uri", uri, "show", "general"]) == 0
    assert "| 1 | @production | a mixture of image_mlp, image_cnn, " in capsys.readouterr().out  # from its spec
    assert client.get_run(version.run_id).data.params["kind"] == "phnn"
    with mlflow.start_run() as run:  # the caller's active experiment is left as it was
        assert client.get_experiment(run.info.experiment_id).name == "Default"

    registered = resolve_checkpoint("models:/general@production", uri)
    assert load_file(registered / WEIGHTS).keys() == load_file(shipped / WEIGHTS).keys()
    assert all(
        torch.equal(load_file(registered / WEIGHTS)[name], tensor)
        for name, tensor in load_file(shipped / WEIGHTS).items()
    )
    model = nn.Linear(10, 1)
    losses = fit(model, metaopt.load_optimizer("models:/general@production", model.parameters(), tracking_uri=uri))
    assert losses[-1] < losses[0]

    optimizer = make_optimizer("phnn", init_lr=0.003)  # a checkpoint folder registers the same way
    folder = save_checkpoint(tmp_path, 0, optimizer, optimizer.init_meta_params(0), name="folder")
    assert metaopt_main(["registry", "--tracking-uri", uri, "register", str(folder), "general"]) == 0
    assert "registered general version 2" in capsys.readouterr().out
    assert weights_sha256(resolve_checkpoint("models:/general/2", uri)) == weights_sha256(folder)
