"""Meta-training on a real two-node Ray cluster on this machine: a rollout worker placed on each
node by a custom resource, MNIST sent to the second node through the object store, and the second
node lost mid-run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import ray
import torch
from conftest import _free_port, _stop_group, ray_start
from test_distributed import config, cpu_ticks, train_on_ray

from metaopt.config import ConfigError
from metaopt.distributed import ray_workers
from metaopt.meta import MetaTrainer, load_checkpoint

pytestmark = pytest.mark.integration  # real Ray clusters or MLflow servers

# Test cluster only: the GCS declares a node dead after 4 failed health checks 0.5 s apart (about
# 2 s for a killed raylet, whose checks fail at once; Ray's defaults take about 15 s). A check may
# take 5 s before it counts as failed, so a busy machine does not lose a live node.
HEALTH_CHECKS = {"health_check_period_ms": 500, "health_check_failure_threshold": 4, "health_check_timeout_ms": 5000}
# One `rollout` per node: workers asking for one each land one per node, although the second node
# alone has the CPUs for two.
NODE_RESOURCES = json.dumps({"rollout": 1})


def process_tree(root: int) -> list[int]:
    """``root`` and every process descended from it, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):  # a process that exits meanwhile
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def wait_until(condition, process: subprocess.Popen, temp_dir: Path, timeout: float = 120.0) -> None:
    """Wait for ``condition`` while the node ``process`` started with ``temp_dir`` runs."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"a ray start node did not come up; see {temp_dir.with_suffix('.log')}")
        time.sleep(0.5)


@dataclass
class TwoNodes:
    """A head (1 CPU) and a second node (2 CPUs), each with one ``rollout``, both started with
    ``ray start --block``; this process is connected to the head as the driver."""

    address: str
    head: str  # node ID
    root: Path
    second: str = ""  # node ID
    second_process: subprocess.Popen | None = None
    second_dir: Path | None = None
    started: list[subprocess.Popen] = field(default_factory=list)

    def start_second(self, wait: bool = True) -> None:
        self.second_dir = Path(tempfile.mkdtemp(prefix="second", dir=self.root))
        self.second_process = ray_start(
            self.second_dir, f"--address={self.address}", "--num-cpus=2", f"--resources={NODE_RESOURCES}"
        )
        self.started.append(self.second_process)
        if wait:
            self.wait_for_second()

    def wait_for_second(self) -> None:
        wait_until(lambda: self._second_node() is not None, self.second_process, self.second_dir)
        self.second = self._second_node()

    def kill_second(self) -> None:
        """SIGKILL every process of the second node (raylet, agents, its workers): a lost machine."""
        for pid in process_tree(self.second_process.pid):  # Ray starts each worker in a process group of its own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.second_process.wait()

    def _second_node(self) -> str | None:
        return next((n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != self.head), None)


@pytest.fixture(scope="module")
def cluster() -> TwoNodes:
    """The two-node cluster of this module, stopped by the process groups it started."""
    root = Path(tempfile.mkdtemp(prefix="ray2", dir="/tmp"))
    head_dir = root / "head"
    address = f"127.0.0.1:{_free_port()}"
    head = ray_start(
        head_dir,
        "--head",
        f"--port={address.split(':')[1]}",
        "--num-cpus=1",
        f"--resources={NODE_RESOURCES}",
        "--include-dashboard=false",
        f"--ray-client-server-port={_free_port()}",
        f"--system-config={json.dumps(HEALTH_CHECKS)}",
    )
    nodes = TwoNodes(address, "", root, started=[head])
    try:
        nodes.start_second(wait=False)  # it waits for the head's GCS itself: both start at once
        wait_until((head_dir / "ray_current_cluster").exists, head, head_dir)
        ray.init(address=address, logging_level="WARNING")
        nodes.head = ray.get_runtime_context().get_node_id()
        nodes.wait_for_second()
        yield nodes
    finally:
        ray.shutdown()
        for process in reversed(nodes.started):
            # Briefly: the SIGTERM reaches the GCS too, so the head's drain (up to 30 s) cannot succeed.
            _stop_group(process, grace=2.0)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def two_nodes(cluster: TwoNodes) -> TwoNodes:
    """The module's cluster, with a fresh second node if a test before this one killed it."""
    if cluster.second_process.poll() is not None:
        cluster.start_second()
    return cluster


def test_mnist_meta_trains_with_a_worker_on_each_node(two_nodes, tmp_path, mnist_task):
    # The driver puts the data in the head's object store; the second node's worker reads it from there.
    cfg = config(
        distributed={"workers": 2, "resources": {"rollout": 1}},
        task={**mnist_task, "batch_size": 16},
        meta_steps=2,
        unroll=2,
        episode_length=4,
        batch_size=2,
        eval_runs=2,
    )
    with ray_workers(cfg, two_nodes.address) as group:
        nodes = sorted(node for _, node in group.worker_places())
        trainer = MetaTrainer(cfg, tmp_path / "run", gradient_source=group)
        trainer.train(show_progress=False)
    assert nodes == sorted([two_nodes.head, two_nodes.second])
    last = trainer.history[-1]
    assert trainer.meta_step == 2 and last["workers_reporting"] == 2 and last["worker_failures"] == 0
    assert torch.isfinite(torch.tensor([last["meta_loss"], last["heldout_loss"]])).all()


def test_resources_the_cluster_lacks_fail_before_any_worker_starts(two_nodes):
    with pytest.raises(
        ConfigError,
        match=r"resources.rollout=2 needs 4 rollout but the Ray cluster has 2 "
        r"\(its custom resources: rollout=2\)",
    ):
        with ray_workers(config(distributed={"workers": 2, "resources": {"rollout": 2}}), two_nodes.address):
            pass
    with pytest.raises(
        ConfigError,
        match=r"needs 1 gpu_node but the Ray cluster has 0 .*ray start "
        r"--resources='\{\"gpu_node\": N\}'",
    ):
        with ray_workers(config(distributed={"resources": {"gpu_node": 1}}), two_nodes.address):
            pass


def test_losing_the_second_node_mid_run_leaves_the_head_worker_training(two_nodes, tmp_path):
    restart_timeout = 2.0
    cfg = config(
        distributed={"workers": 2, "resources": {"rollout": 1}, "restart_timeout": restart_timeout},
        task={"kind": "quadratic", "dim": 100},
        meta_steps=8,
        batch_size=64,
        unroll=10,
        episode_length=20,
    )
    seen = {}

    def lose_second_node_mid_unroll(pid: int) -> None:
        start = cpu_ticks(pid)  # the worker idles between meta-steps: CPU time accrues only mid-unroll
        while cpu_ticks(pid) - start < 5:
            time.sleep(0.005)
        two_nodes.kill_second()

    def on_metrics(meta_step: int, metrics: dict) -> None:
        if meta_step == 1:
            seen["places"] = dict(group.worker_places())
            second_pid = next(pid for pid, node in seen["places"].items() if node == two_nodes.second)
            threading.Thread(target=lose_second_node_mid_unroll, args=(second_pid,), daemon=True).start()
        elif metrics["workers_reporting"] == 1 and "lost_at" not in seen:
            seen["lost_at"], seen["alive_then"] = meta_step, metrics["workers_alive"]
            # Ray cannot restart the worker (its `rollout` is on the head, taken): once the learner
            # has waited distributed.restart_timeout for it, the next meta-step drops it.
            time.sleep(restart_timeout)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ray_workers(cfg, two_nodes.address) as group:
            trainer = MetaTrainer(cfg, tmp_path / "run", gradient_source=group)
            final = trainer.train(show_progress=False, on_metrics=on_metrics)
            places = group.worker_places()
    assert sorted(seen["places"].values()) == sorted([two_nodes.head, two_nodes.second])
    assert not any(n["Alive"] for n in ray.nodes() if n["NodeID"] == two_nodes.second)
    assert seen["lost_at"] < 8 and seen["alive_then"] == 2  # first skipped while Ray tried to restart it
    assert [node for _, node in places] == [two_nodes.head]
    last = trainer.history[-1]
    assert trainer.meta_step == 8 and last["workers_alive"] == 1 and last["worker_failures"] == 1
    assert any(
        "has not answered for 2 s since it failed (distributed.restart_timeout)" in str(w.message)
        and "the run goes on with 1 of 2 workers" in str(w.message)
        for w in caught
    )

    _, _, spec = load_checkpoint(final)
    assert spec["meta_step"] == 8
    _, best, _ = load_checkpoint(trainer.best_checkpoint)
    assert all(torch.isfinite(value).all() for value in best.values())

    # What is left has one `rollout`: two workers no longer fit, one resumes the run.
    with pytest.raises(
        ConfigError,
        match=r"needs 2 rollout but the Ray cluster has 1 "
        r"\(its custom resources: rollout=1\)",
    ):
        with ray_workers(cfg, two_nodes.address):
            pass
    one = config(
        distributed={"workers": 1, "resources": {"rollout": 1}},
        task={"kind": "quadratic", "dim": 100},
        meta_steps=10,
        batch_size=64,
        unroll=10,
        episode_length=20,
    )
    with pytest.warns(UserWarning, match=r"from 1 Ray worker\(s\) \(of 2 started\), this run has 1 \(of 1\)"):
        resumed = train_on_ray(one, tmp_path / "resumed", two_nodes.address, resume=final)
    assert resumed.history[0]["meta_step"] == 9 and resumed.meta_step == 10
