"""The Ray job entrypoints take `metaopt train`/`metaopt tune`'s options, and the README's Ray-jobs flow runs as
a user runs it: cluster/local.sh starts a real head with token authentication, and a job submitted with the
exports it prints meta-trains, while a client without the token is refused."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO_ROOT, TINY_TRAIN, _free_port

from jobs import meta_train, tune
from metaopt.cli import build_parser
from metaopt.meta import load_checkpoint

pytestmark = pytest.mark.integration  # real Ray clusters or MLflow servers


@pytest.mark.parametrize(
    "job,command,config",
    [
        (meta_train, "train", "jobs/configs/train_quadratic_phnn.yaml"),
        (tune, "tune", "jobs/configs/tune_quadratic_phnn.yaml"),
    ],
    ids=["meta_train", "tune"],
)
def test_job_takes_the_cli_options(job, command, config):
    """``jobs/X.py --config C OPTIONS`` parses as ``metaopt X C --address auto --no-progress OPTIONS``."""
    options = [
        "--set",
        "train.meta_steps=2",
        "--output",
        "out",
        "--resume",
        "out",
        "--no-tracking",
        "--tracking-uri",
        "http://127.0.0.1:5000",
        "--register",
        "best",
    ]
    parsed = job.parse(["--config", config, *options])
    assert vars(parsed) == vars(
        build_parser().parse_args([command, config, "--address", "auto", "--no-progress", *options])
    )
    assert parsed.no_tracking and parsed.tracking_uri == "http://127.0.0.1:5000" and parsed.register == "best"
    assert job.parse(["--config", config, "--address", "ray://head:10001"]).address == "ray://head:10001"


def _head_processes(pgid: int, state: Path) -> list[int]:
    """Live (not zombie) processes in the head's process group, or with their output under its state folder
    (Ray's workers and the job's driver, which leave that group)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            status, _, group = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError):
            continue
        outputs = []
        for fd in ("1", "2"):
            try:
                outputs.append(os.readlink(proc / "fd" / fd))
            except OSError:
                pass
        if status != "Z" and (int(group) == pgid or any(out.startswith(str(state)) for out in outputs)):
            found.append(int(proc.name))
    return found


def test_readme_job_flow_with_token_authentication(tmp_path):
    """README's flow in a shell whose HOME holds the ~/.ray/auth_token a local ray.init() saved (mode 0644, as
    Ray writes it), RAY_AUTH_* unset: cluster/local.sh, its exports, ray job submit, ray job logs, local.sh stop."""
    home = tmp_path / "home"
    token_file = home / ".ray" / "auth_token"
    token_file.parent.mkdir(parents=True)
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o644)
    state = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    shell = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_") and k != "RAY_ADDRESS"}
    shell.update(
        HOME=str(home),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        METAOPT_RAY_DIR=str(state),
        RAY_PORT=str(_free_port()),
        RAY_DASHBOARD_PORT=str(_free_port()),
    )

    def sh(*args: str, env: dict = shell, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)

    try:
        started = sh(
            "cluster/local.sh",
            "start",
            "--num-cpus=2",
            "--num-gpus=0",
            f"--ray-client-server-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
        )
        assert started.returncode == 0, started.stdout + started.stderr
        address = f"http://127.0.0.1:{shell['RAY_DASHBOARD_PORT']}"
        exports = dict(re.findall(r"^\s*export (\w+)=(\S+)$", started.stdout, re.M))
        assert exports == {"RAY_ADDRESS": address, "RAY_AUTH_MODE": "token"}, started.stdout
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600, "local.sh left the token readable by others"
        head = int((state / "head.pid").read_text())

        # What the token protects: the job API refuses a client without it (Ray's default mode, 'disabled', sends
        # none) and one with another token.
        refused = sh("ray", "job", "list", env={**shell, "RAY_ADDRESS": address})
        assert refused.returncode != 0 and "Authentication required" in refused.stdout + refused.stderr, refused
        for headers, code in (({}, 401), ({"Authorization": f"Bearer {secrets.token_hex(32)}"}, 403)):
            with pytest.raises(urllib.error.HTTPError) as error:
                urllib.request.urlopen(urllib.request.Request(f"{address}/api/jobs/", headers=headers), timeout=10)
            assert error.value.code == code

        client = {**shell, **exports}
        output = tmp_path / "run"
        submitted = sh(
            "ray",
            "job",
            "submit",
            "--working-dir",
            ".",
            "--",
            "python",
            "jobs/meta_train.py",
            "--config",
            "jobs/configs/train_quadratic_phnn.yaml",
            "--set",
            "distributed.workers=1",
            *TINY_TRAIN,
            "--no-tracking",
            "--output",
            str(output),
            env=client,
            timeout=300,
        )
        job_id = re.search(r"raysubmit_\w+", submitted.stdout)
        assert submitted.returncode == 0 and job_id and f"Job '{job_id[0]}' succeeded" in submitted.stdout, (
            submitted.stdout + submitted.stderr
        )
        logs = sh("ray", "job", "logs", job_id[0], env=client)
        assert logs.returncode == 0 and "on Ray with 1 sync worker(s)" in logs.stdout, logs.stdout + logs.stderr
        assert "meta-step 2: meta-loss" in logs.stdout and "MLflow run" not in logs.stdout
        _, _, spec = load_checkpoint(output / "checkpoints" / "meta_step_000004")
        assert spec["meta_step"] == 4 and spec["kind"] == "phnn"

        clock = time.monotonic()
        stopped = sh("cluster/local.sh", "stop")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert time.monotonic() - clock < 30, "the head did not stop on SIGTERM: stop fell back to SIGKILL"
        deadline = time.monotonic() + 10
        while _head_processes(head, state) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _head_processes(head, state), "stop left processes of the head running"
    finally:
        if (state / "head.pid").exists():  # a check above failed: stop the head, then whatever it left
            head = int((state / "head.pid").read_text())
            sh("cluster/local.sh", "stop")
            for pid in _head_processes(head, state):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(state, ignore_errors=True)
