"""The Ray job entrypoints take `metaopt train`/`metaopt tune`'s options and refuse a run folder or MLflow store
that the job's temporary working folder would take with it, and the README's Ray-jobs flow runs as a user runs
it after the Quickstart, from a shell without the virtual environment on PATH: cluster/local.sh starts a real
head on loopback only with token authentication, and a job submitted with the exports it prints meta-trains,
while a client without the token is refused."""

from __future__ import annotations

import ipaddress
import json
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
from metaopt.config import ConfigError
from metaopt.meta import load_checkpoint
from metaopt.tracking.tracker import RUN_FILE

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


JOBS = [(meta_train, "jobs/configs/train_quadratic_phnn.yaml"), (tune, "jobs/configs/tune_quadratic_phnn.yaml")]


@pytest.mark.parametrize(
    "options,env,refused",
    [
        ([], None, r"MLflow store sqlite:///mlflow\.db \(MLflow's default\) is relative"),
        (["--tracking-uri", "sqlite:///mlflow.db"], None, "MLflow store sqlite:///mlflow.db is relative"),
        (["--tracking-uri", "file:mlruns"], None, "MLflow store file:mlruns is relative"),
        (["--tracking-uri", "./mlruns"], None, "MLflow store ./mlruns is relative"),
        ([], "sqlite:///runs.db", "MLflow store sqlite:///runs.db is relative"),
        (["--no-tracking", "--output", "runs/x"], None, "output folder runs/x is relative"),
        (["--no-tracking"], None, "output folder runs/(train|tune) is relative"),
    ],
    ids=["default store", "relative sqlite", "relative file uri", "relative path", "env", "output", "default output"],
)
@pytest.mark.parametrize("job,config", JOBS, ids=["meta_train", "tune"])
def test_job_refuses_what_its_working_folder_takes_with_it(job, config, options, env, refused, tmp_path, monkeypatch):
    """A relative run folder or MLflow store (MLflow's default included) would be in the job's temporary copy of
    its working folder: the job stops before it starts, with an error naming the fix."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    if env:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
    store = "MLflow store" in refused
    if store:
        options = [*options, "--output", str(tmp_path / "run")]
    with pytest.raises(ConfigError, match=refused) as error:
        job.check(job.parse(["--config", config, *options]))
    fix = "sqlite:////ABSOLUTE/PATH" if store else "--output (and --resume) an absolute path"
    assert "temporary copy that Ray deletes" in str(error.value) and fix in str(error.value)


def test_job_reports_the_refusal_as_one_line(tmp_path, monkeypatch, capsys):
    """The refusal is an error line of `metaopt train`'s, exit 2, before Ray or MLflow is touched."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config, output = "jobs/configs/train_quadratic_phnn.yaml", str(tmp_path / "run")
    assert meta_train.main(["--config", config, "--output", output]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("metaopt train: error: the MLflow store sqlite:///mlflow.db (MLflow's default)"), line


@pytest.mark.parametrize("job,config", JOBS, ids=["meta_train", "tune"])
def test_job_takes_absolute_stores_and_keeps_artifacts_beside_sqlite(job, config, tmp_path, monkeypatch):
    """Absolute folders, servers and --no-tracking pass; a new experiment in an absolute SQLite store keeps its
    artifacts beside the store, not in ./mlruns of the process that creates it (the job's working folder)."""
    from mlflow import MlflowClient

    from metaopt.tracking import RunTracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = str(REPO_ROOT / config)
    monkeypatch.chdir(tmp_path)  # the job's working folder
    output = str(tmp_path / "runs" / "x")
    for options in (["--no-tracking"], ["--tracking-uri", "http://127.0.0.1:5000"], ["--tracking-uri", "databricks"]):
        job.check(job.parse(["--config", config, "--output", output, *options]))
    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    job.check(job.parse(["--config", config, "--output", output, "--tracking-uri", uri]))
    RunTracker(tmp_path / "runs" / "x", uri, experiment="metaopt").finish()  # as the job's run starts and ends
    experiment = MlflowClient(uri).get_experiment_by_name("metaopt")
    assert experiment is not None and experiment.artifact_location == (store / "mlruns" / "metaopt").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    job.check(job.parse(["--config", config, "--output", output]))
    assert not (tmp_path / "mlruns").exists()


def _system_path() -> str:
    """This process's PATH without a virtual environment's folders: a fresh shell's after the Quickstart."""
    venv = os.path.realpath(Path(sys.executable).parent)
    return os.pathsep.join(
        folder
        for folder in os.environ["PATH"].split(os.pathsep)
        if folder and ".venv" not in folder and os.path.realpath(folder) != venv
    )


def _listening(pids: list[int]) -> set[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """The (address, port) pairs the processes ``pids`` listen on over TCP: /proc/net/tcp{,6} rows whose socket
    inode one of their file descriptors holds."""
    inodes = set()
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:  # it exited meanwhile
            continue
        for fd in fds:
            try:
                link = os.readlink(fd)
            except OSError:  # closed meanwhile
                continue
            if link.startswith("socket:["):
                inodes.add(link[len("socket:[") : -1])
    found = set()
    for table in ("tcp", "tcp6"):
        for row in Path("/proc/net", table).read_text().splitlines()[1:]:
            local, state, inode = (fields := row.split())[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN; addresses are little-endian 32-bit words
                address, port = local.split(":")
                words = bytes.fromhex(address)
                ip = ipaddress.ip_address(b"".join(words[i : i + 4][::-1] for i in range(0, len(words), 4)))
                found.add((ip, int(port, 16)))
    return found


def _loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """127.0.0.0/8 or ::1, also as an IPv4-mapped IPv6 address."""
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return address.is_loopback or bool(mapped and mapped.is_loopback)


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
    """README's flow after the Quickstart, in a fresh shell: PATH without the virtual environment (so neither `ray`
    nor the project's `python` on it), HOME holding the ~/.ray/auth_token a local ray.init() saved (mode 0644, as
    Ray writes it), RAY_AUTH_* unset: cluster/local.sh, its exports, .venv/bin/ray job submit, .venv/bin/ray job
    logs, local.sh stop. The head listens on loopback only; a job's relative MLflow store is refused."""
    ray = ".venv/bin/ray"  # as the README says, relative to the checkout
    assert (REPO_ROOT / ray).is_file(), f"no {ray}: the flow runs in the Quickstart's environment (uv sync)"
    home = tmp_path / "home"
    token_file = home / ".ray" / "auth_token"
    token_file.parent.mkdir(parents=True)
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o644)
    state = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    shell = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_AUTH_", "MLFLOW_"))
        and k not in ("RAY_ADDRESS", "VIRTUAL_ENV", "RAY_ENABLE_UV_RUN_RUNTIME_ENV")
    }
    shell.update(
        HOME=str(home),
        PATH=_system_path(),
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
        assert f"{ray} job submit --working-dir . -- python jobs/meta_train.py" in started.stdout, started.stdout
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600, "local.sh left the token readable by others"
        head = int((state / "head.pid").read_text())

        # What the token protects: the job API refuses a client without it (Ray's default mode, 'disabled', sends
        # none) and one with another token.
        refused = sh(ray, "job", "list", env={**shell, "RAY_ADDRESS": address})
        assert refused.returncode != 0 and "Authentication required" in refused.stdout + refused.stderr, refused
        for headers, code in (({}, 401), ({"Authorization": f"Bearer {secrets.token_hex(32)}"}, 403)):
            with pytest.raises(urllib.error.HTTPError) as error:
                urllib.request.urlopen(urllib.request.Request(f"{address}/api/jobs/", headers=headers), timeout=10)
            assert error.value.code == code

        client = {**shell, **exports}
        output, store = tmp_path / "run", tmp_path / "mlflow"
        store.mkdir()
        job = [ray, "job", "submit", "--working-dir", ".", "--", "python", "jobs/meta_train.py"]
        job += ["--config", "jobs/configs/train_quadratic_phnn.yaml", "--set", "distributed.workers=1"]
        job += [*TINY_TRAIN, "--output", str(output)]

        # MLflow's default store would be in the job's temporary working folder: the job stops, naming the fix.
        lost = sh(*job, env=client, timeout=300)
        assert lost.returncode != 0 and "the MLflow store sqlite:///mlflow.db (MLflow's default) is relative" in (
            lost.stdout
        ), lost.stdout + lost.stderr

        uri = f"sqlite:///{store / 'mlflow.db'}"
        submitted = sh(*job, "--tracking-uri", uri, env=client, timeout=300)
        job_id = re.search(r"raysubmit_\w+", submitted.stdout)
        assert submitted.returncode == 0 and job_id and f"Job '{job_id[0]}' succeeded" in submitted.stdout, (
            submitted.stdout + submitted.stderr
        )

        # Every TCP port of the head's processes (GCS, raylet, dashboard and its agents, Ray client server,
        # metrics, the job's workers) listens on loopback only.
        listening = _listening(_head_processes(head, state))
        ports = {port for _, port in listening}
        assert {int(shell["RAY_PORT"]), int(shell["RAY_DASHBOARD_PORT"])} <= ports and len(ports) >= 8, listening
        exposed = sorted(f"{ip}:{port}" for ip, port in listening if not _loopback(ip))
        assert not exposed, f"the head listens beyond loopback: {exposed}"

        logs = sh(ray, "job", "logs", job_id[0], env=client)
        assert logs.returncode == 0 and "on Ray with 1 sync worker(s)" in logs.stdout, logs.stdout + logs.stderr
        assert "meta-step 2: meta-loss" in logs.stdout and "MLflow run" in logs.stdout
        _, _, spec = load_checkpoint(output / "checkpoints" / "meta_step_000004")
        assert spec["meta_step"] == 4 and spec["kind"] == "phnn"
        # The run and its artifacts are beside the store, not in the job's working folder.
        run_id = json.loads((output / RUN_FILE).read_text())["run_id"]
        assert (store / "mlruns" / "metaopt" / run_id / "artifacts" / "checkpoints" / "meta_step_000004").is_dir()

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
