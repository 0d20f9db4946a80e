"""Shared fixtures: the real MNIST test split shipped beside the checkout, and a real local Ray cluster."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


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


@pytest.fixture(scope="session")
def ray_cluster() -> RayCluster:
    """``ray start --head --block`` on 127.0.0.1 (2 CPUs, dashboard for the job API), stopped by its PID.

    The head runs in its own process group, so the teardown signals exactly the processes it
    started (GCS, raylet, dashboard, workers), never others by name. Its temp dir is private, so
    a plain ``ray.init()`` elsewhere in the suite never finds this cluster.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    dashboard_port = _free_port()
    command = [
        str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", "--port=0", f"--temp-dir={temp_dir}", "--num-cpus=2", "--num-gpus=0",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={_free_port()}",
    ]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    log = open(temp_dir.with_suffix(".log"), "w")
    head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address_file = temp_dir / "ray_current_cluster"
    dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 120
        while not (address_file.exists() and _answers(f"{dashboard_url}/api/version")):
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start --head failed; see {log.name}")
            time.sleep(0.5)
        yield RayCluster(address_file.read_text().strip(), dashboard_url, head.pid)
    finally:
        _stop_group(head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
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
