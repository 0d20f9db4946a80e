"""Meta-training on a real local Ray cluster (``ray start --head`` on 127.0.0.1, stopped by PID)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from ray.exceptions import ActorUnavailableError

from metaopt.cli import main as metaopt_main
from metaopt.config import ConfigError, validate_config
from metaopt.distributed import flatten, ray_workers, unflatten
from metaopt.meta import MetaTrainer, load_checkpoint
from metaopt.optimizers import make_optimizer

pytestmark = pytest.mark.integration  # real Ray clusters or MLflow servers

REPO_ROOT = Path(__file__).resolve().parents[1]


def config(distributed: dict | None = None, task: dict | None = None, **train):
    return validate_config(
        {
            "task": task or {"kind": "quadratic", "dim": 10},
            "optimizer": {"kind": "phnn"},
            "train": {
                "meta_steps": 4,
                "unroll": 5,
                "episode_length": 10,
                "batch_size": 4,
                "eval_every": 2,
                "eval_runs": 4,
                "checkpoint_every": 2,
                "estimator": {"second_order": True},
                **train,
            },
            "distributed": {"workers": 1, **(distributed or {})},
            "device": "cpu",
        }
    )


def train_on_ray(cfg, run_dir, address, on_metrics=None, resume=None) -> MetaTrainer:
    with ray_workers(cfg, address) as group:
        trainer = MetaTrainer(cfg, run_dir, gradient_source=group)
        if resume:
            trainer.resume(resume)
        trainer.train(show_progress=False, on_metrics=on_metrics)
    return trainer


def test_flat_round_trip():
    params = make_optimizer("lstm").init_meta_params(0)
    flat = flatten(params)
    assert flat.dtype.name == "float32" and flat.shape == (5301,)
    for name, value in unflatten(flat, params).items():
        assert torch.equal(value, params[name])
    with pytest.raises(ValueError, match="5300 values"):
        unflatten(flat[:-1], params)


def test_one_sync_worker_gives_the_single_process_meta_parameters(ray_cluster, tmp_path):
    cfg = config(distributed={"num_cpus": 1})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the worker's thread count, so reductions round the same way
    try:
        alone = MetaTrainer(cfg, tmp_path / "alone")
        alone.train(show_progress=False)
    finally:
        torch.set_num_threads(threads)
    on_ray = train_on_ray(cfg, tmp_path / "ray", ray_cluster.address)
    for name, value in alone.meta_params.items():
        torch.testing.assert_close(on_ray.meta_params[name], value, rtol=1e-6, atol=1e-7)
    assert not torch.equal(alone.meta_params["log_h"], make_optimizer("phnn").init_meta_params(0)["log_h"])


def test_two_workers_share_mnist_from_the_object_store(ray_cluster, tmp_path, mnist_task):
    cfg = config(
        distributed={"workers": 2},
        task={**mnist_task, "batch_size": 16},
        meta_steps=2,
        unroll=2,
        episode_length=4,
        batch_size=2,
        eval_runs=2,
    )
    trainer = train_on_ray(cfg, tmp_path / "run", ray_cluster.address)
    last = trainer.history[-1]
    assert last["workers_alive"] == 2 and last["worker_failures"] == 0 and last["straggler_ratio"] >= 1
    assert last["optimizee_steps_per_s"] > 0 and torch.isfinite(torch.tensor(last["heldout_loss"]))
    assert 0 <= last["ray_overhead_fraction"] < 1


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_two_workers_meta_train_on_a_mixture_each_drawing_its_own_tasks(ray_cluster, tmp_path, mnist_task, mode):
    image_mlp = {"kind": "image_mlp", "image_size": [8], "hidden_sizes": [[8], [16]], "data": mnist_task["data"]}
    tasks = [{"task": {"kind": "quadratic", "dim": 5}}, {"task": image_mlp, "weight": 2}]
    cfg = config(distributed={"workers": 2, "mode": mode}, tasks=tasks, meta_steps=6, unroll=2, episode_length=4)
    trainer = train_on_ray(cfg, tmp_path / "run", ray_cluster.address)
    assert trainer.meta_step == 6 and trainer.history[-1]["workers_alive"] == 2
    assert all(torch.isfinite(torch.tensor(row["meta_loss"])) for row in trainer.history)
    start = make_optimizer("phnn").init_meta_params(0)
    assert not torch.equal(trainer.meta_params["log_h"], start["log_h"])


def test_async_mode_applies_each_gradient_and_drops_stale_ones(ray_cluster, tmp_path):
    cfg = config(distributed={"workers": 2, "mode": "async", "max_staleness": 0}, meta_steps=6)
    trainer = train_on_ray(cfg, tmp_path / "run", ray_cluster.address)
    assert trainer.meta_step == 6
    # With two workers racing, the second result of every round was computed from older
    # meta-parameters; a bound of 0 drops it.
    assert trainer.history[-1]["stale_dropped"] >= 1
    assert all(row["staleness"] == 0 for row in trainer.history)


def cpu_ticks(pid: int) -> int:
    """User + system CPU time of a process, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def kill_once_busy(pid: int, busy_ticks: int = 5) -> None:
    """SIGKILL ``pid`` as soon as it has spent ``busy_ticks`` of CPU time, i.e. mid-computation."""
    start = cpu_ticks(pid)
    while cpu_ticks(pid) - start < busy_ticks:
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)


def wait_for_restart(group, deadline_s: float = 180.0) -> list[int]:
    """The live workers' PIDs once Ray has restarted the dead one (it answers again)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return group.worker_pids()
        except ActorUnavailableError:
            if time.monotonic() > deadline:
                raise AssertionError(f"Ray did not restart the killed worker within {deadline_s:.0f} s") from None
            time.sleep(0.2)


def test_a_worker_killed_mid_unroll_rejoins_until_ray_runs_out_of_restarts(ray_cluster, tmp_path):
    cfg = config(
        distributed={"workers": 2, "max_restarts": 1},
        task={"kind": "quadratic", "dim": 100},
        meta_steps=10,
        batch_size=64,
        unroll=10,
        episode_length=20,
        checkpoint_every=5,
    )
    seen = {"killed": []}

    def kill_mid_unroll(pid: int) -> None:
        # A real SIGKILL of the worker's process once it is busy with the next meta-step's unroll
        # (it idles between meta-steps, so CPU time only accrues while it computes).
        threading.Thread(target=kill_once_busy, args=(pid,), daemon=True).start()
        seen["killed"].append(pid)

    def on_metrics(meta_step: int, metrics: dict) -> None:
        if meta_step == 2:
            kill_mid_unroll(group.worker_pids()[0])
        elif len(seen["killed"]) == 1 and metrics["worker_failures"] == 1 and "restarted_pid" not in seen:
            seen["restarted_pid"], seen["other_pid"] = wait_for_restart(group)
        elif "restarted_pid" in seen and "rejoined_at" not in seen and metrics["workers_reporting"] == 2:
            seen["rejoined_at"] = meta_step  # the restarted worker's share counts again
            kill_mid_unroll(seen["restarted_pid"])  # max_restarts=1: this death is final

    with ray_workers(cfg, ray_cluster.address) as group:
        first_pids = group.worker_pids()
        trainer = MetaTrainer(cfg, tmp_path / "run", gradient_source=group)
        with pytest.warns(UserWarning, match="dropped Ray RolloutWorker 0 because it died and Ray has no restarts"):
            trainer.train(show_progress=False, on_metrics=on_metrics)
        final_pids = group.worker_pids()
    assert seen["restarted_pid"] != first_pids[0] and seen["other_pid"] == first_pids[1]
    assert seen["rejoined_at"] < 10 and trainer.meta_step == 10
    last = trainer.history[-1]
    assert last["worker_failures"] == 2 and last["workers_alive"] == 1 and last["workers_reporting"] == 1
    assert final_pids == [first_pids[1]]
    assert (tmp_path / "run" / "checkpoints" / "meta_step_000010" / "spec.json").exists()


def test_resume_on_ray_continues_exactly(ray_cluster, tmp_path):
    cfg = config(distributed={"workers": 2}, meta_steps=6)
    straight = train_on_ray(cfg, tmp_path / "straight", ray_cluster.address)
    # Its meta-step 4 checkpoint is where a run cut there would stop; new workers continue from it.
    resumed = train_on_ray(
        cfg,
        tmp_path / "resumed",
        ray_cluster.address,
        resume=tmp_path / "straight" / "checkpoints" / "meta_step_000004",
    )
    assert resumed.history[0]["meta_step"] == 5
    for name, value in straight.meta_params.items():
        torch.testing.assert_close(resumed.meta_params[name], value, rtol=0, atol=0)


def test_requests_the_cluster_cannot_meet_fail_before_any_worker_starts(ray_cluster, tmp_path):
    with pytest.raises(ConfigError, match=r"needs 6 CPUs but the Ray cluster has 2"):
        with ray_workers(config(distributed={"workers": 3, "num_cpus": 2}, batch_size=3), ray_cluster.address):
            pass
    with pytest.raises(ConfigError, match=r"num_gpus=0.25 needs 0.25 GPUs but the Ray cluster has 0"):
        with ray_workers(config(distributed={"num_gpus": 0.25}), ray_cluster.address):
            pass


def test_what_a_workers_setup_finds_wrong_is_raised_as_itself_and_the_workers_stop(ray_cluster):
    """A task factory failing on the workers (here ``builtins:dict``, importable everywhere, returns no task): the
    learner raises the worker's own error, not Ray's actor-death traceback, and kills the workers."""
    from ray.util.state import list_actors

    from metaopt.tasks import TaskFactoryError

    with pytest.raises(TaskFactoryError, match=r"^task.factory 'builtins:dict' returned a dict, not a metaopt"):
        with ray_workers(config(task={"kind": "module", "factory": "builtins:dict"}), ray_cluster.address):
            pass
    with ray_workers(config(), ray_cluster.address):  # only the new group's worker is alive
        alive = list_actors(filters=[("class_name", "=", "RolloutWorker"), ("state", "=", "ALIVE")])
        assert len(alive) == 1


def test_batch_must_split_evenly_across_workers():
    with pytest.raises(ConfigError, match=r"train.batch_size \(4\) must be a multiple of distributed.workers \(3\)"):
        config(distributed={"workers": 3})


def test_metaopt_train_cli_on_ray(ray_cluster, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's default ./mlflow.db and ./mlruns land here, not in the checkout
    code = metaopt_main(
        [
            "train",
            str(REPO_ROOT / "jobs/configs/train_quadratic_phnn.yaml"),
            "--no-progress",
            "--address",
            ray_cluster.address,
            "--output",
            str(tmp_path / "run"),
            "--set",
            "train.meta_steps=2",
            "--set",
            "train.eval_every=1",
            "--set",
            "distributed.workers=2",
            "--set",
            "evaluate.runs=5",
            "--set",
            "evaluate.optimizers=[{kind: adam, lr: 0.1}]",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "on Ray with 2 sync worker(s)" in out and "meta-step 2: meta-loss" in out
    _, weights, spec = load_checkpoint(tmp_path / "run" / "checkpoints" / "meta_step_000002")
    assert spec["kind"] == "phnn" and spec["meta_step"] == 2


def test_ray_job_submission_meta_trains_and_checkpoints(ray_cluster, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_cluster.dashboard_url)
    output = tmp_path / "job-run"
    job_id = client.submit_job(
        entrypoint=(
            "python jobs/meta_train.py --config jobs/configs/train_quadratic_phnn.yaml "
            f"--output {output} --tracking-uri sqlite:///{tmp_path / 'mlflow.db'} "
            "--set train.meta_steps=3 --set train.eval_every=3 --set distributed.workers=2 "
            "--set evaluate.runs=5 --set 'evaluate.optimizers=[{kind: adam, lr: 0.1}]'"
        ),
        runtime_env={"working_dir": str(REPO_ROOT), "excludes": [".venv", ".tools", ".git", "runs", "mlruns"]},
    )
    deadline = time.monotonic() + 300
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, client.get_job_logs(job_id)
        time.sleep(1)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs
    assert "on Ray with 2 sync worker(s)" in logs and "meta-step 3: meta-loss" in logs
    _, _, spec = load_checkpoint(output / "checkpoints" / "meta_step_000003")
    assert spec["meta_step"] == 3 and spec["kind"] == "phnn"
    assert f"at sqlite:///{tmp_path / 'mlflow.db'}" in logs  # the job's registration names the store it used
    assert (tmp_path / "mlruns").is_dir()  # the run's artifacts beside the store, not in the job's copy
