"""Shared fixtures: the real MNIST test split shipped beside the checkout, and a real local Ray cluster."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

# As metaopt.distributed does, before anything imports ray: under the README's `uv run pytest`, Ray
# would otherwise start every worker through that uv command line in a copy of the checkout, where
# the project-local .tools/bin/uv does not exist, and no worker would start.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Ray's token authentication on, as a user's cluster runs it, with a token of this session's own: every
# cluster the suite starts and every client it runs (this process, jobs, `ray` commands) inherits both, and
# nothing reads or writes the user's ~/.ray/auth_token.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)

REPO_ROOT = Path(__file__).resolve().parents[1]
# `metaopt train` overrides for a run of seconds: 4 meta-steps, 2 validations, a 5-run comparison with Adam.
TINY_TRAIN = [
    *("--set", "train.meta_steps=4", "--set", "train.eval_every=2", "--set", "train.batch_size=8"),
    *("--set", "train.eval_runs=4", "--set", "evaluate.runs=5"),
    *("--set", "evaluate.optimizers=[{kind: adam, lr: 0.1}]", "--no-progress"),
]


@pytest.fixture(scope="session", autouse=True)
def metaopt_cache(tmp_path_factory) -> Path:
    """``METAOPT_CACHE_DIR`` of the session's own (native builds, registry pulls): nothing lands in the user's
    ~/.cache/metaopt, and every process the suite starts (Ray workers too) shares it."""
    cache = tmp_path_factory.mktemp("metaopt-cache")
    previous = os.environ.get("METAOPT_CACHE_DIR")
    os.environ["METAOPT_CACHE_DIR"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("METAOPT_CACHE_DIR", None)
    else:
        os.environ["METAOPT_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def mnist_root() -> str:
    """``$METAOPT_MNIST_ROOT`` or ``../shared/datasets``: a folder holding MNIST/raw/ (test split)."""
    root = Path(os.environ.get("METAOPT_MNIST_ROOT", REPO_ROOT.parent / "shared" / "datasets"))
    if not (root / "MNIST" / "raw" / "t10k-images-idx3-ubyte").exists():
        pytest.fail(f"MNIST test split not found under {root}; set METAOPT_MNIST_ROOT to a folder holding MNIST/raw/")
    return str(root)


@pytest.fixture
def mnist_task(mnist_root):
    """A task config section for the MNIST MLP on the shipped test split."""
    return {
        "kind": "mnist_mlp",
        "hidden_sizes": [20],
        "data": {"root": mnist_root, "split": "test", "download": False},
    }


@dataclass
class RayCluster:
    """A real local Ray cluster: its GCS address, job-submission (dashboard) URL and head PID."""

    address: str
    dashboard_url: str
    pid: int


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_start(temp_dir: Path, *options: str) -> subprocess.Popen:
    """``ray start --block`` on 127.0.0.1 in its own process group, logging to ``temp_dir``.log."""
    command = [
        str(Path(sys.executable).with_name("ray")),
        "start",
        "--block",
        "--disable-usage-stats",
        "--node-ip-address=127.0.0.1",
        f"--temp-dir={temp_dir}",
        "--num-gpus=0",
        f"--dashboard-agent-listen-port={_free_port()}",
        *options,
    ]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    with open(temp_dir.with_suffix(".log"), "w") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


@pytest.fixture(scope="session")
def ray_cluster() -> RayCluster:
    """``ray start --head --block`` on 127.0.0.1 (2 CPUs, dashboard for the job API), stopped by its PID.

    The head runs in its own process group, so the teardown signals exactly the processes it
    started (GCS, raylet, dashboard, workers), never others by name. Its temp dir is private, so
    a plain ``ray.init()`` elsewhere in the suite never finds this cluster.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    dashboard_port = _free_port()
    head = ray_start(
        temp_dir,
        "--head",
        "--port=0",
        "--num-cpus=2",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={_free_port()}",
    )
    address_file = temp_dir / "ray_current_cluster"
    dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 120
        while not (address_file.exists() and _answers(f"{dashboard_url}/api/version")):
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start --head failed; see {temp_dir.with_suffix('.log')}")
            time.sleep(0.5)
        yield RayCluster(address_file.read_text().strip(), dashboard_url, head.pid)
    finally:
        _stop_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _answers(url: str) -> bool:
    """Whether an HTTP server answers at ``url`` (with any status: a 401 from an authenticated one too)."""
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def _stop_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group ``process`` leads, then SIGKILL whatever is left of it."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 with a SQLite store, started and stopped by PID.

    With ``password``, MLflow's basic-auth app: its user store in ``root``, and an admin user
    ``admin`` with that password, set in its auth config file.
    """

    ADMIN = "admin"

    def __init__(self, root: Path, password: str | None = None):
        self.root = root
        self.password = password
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--backend-store-uri",
            f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.root / "artifacts"),
            "--workers",
            "1",
        ]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner processes to start
        if self.password:
            config = self.root / "basic_auth.ini"
            config.write_text(  # a checked password is cached for a minute: a hash per request would be slow
                f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{self.root / 'basic_auth.db'}\n"
                f"admin_username = {self.ADMIN}\nadmin_password = {self.password}\nauth_cache_ttl_seconds = 60\n"
            )
            command += ["--app-name", "basic-auth"]
            env |= {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(16).hex()}
        log = open(self.root / "server.log", "a")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 120
        while not _answers(f"{self.uri}/health"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server failed to start; see {self.root / 'server.log'}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process is not None:
            _stop_group(self.process, grace=5.0)
            self.process = None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> MlflowServer:
    """One MLflow tracking server (SQLite store, served artifacts) for the session."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    yield server
    server.stop()
