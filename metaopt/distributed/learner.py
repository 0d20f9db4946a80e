"""The learner's side of Ray meta-training: RolloutWorker actors as the trainer's gradient source.

The learner is ``metaopt.meta.MetaTrainer`` itself (clip, skip non-finite, Adam meta-step,
validation, checkpoints); ``WorkerGroup`` replaces its in-process estimator. Each meta-step the
current meta-parameters are put in the object store once as a flat float32 array and every
worker reads them from there:

- ``sync``: every worker estimates on its share; the learner averages what comes back.
- ``async``: workers run continuously; each meta-step applies the first gradient to arrive and
  hands that worker the new meta-parameters. A gradient computed from meta-parameters more than
  ``max_staleness`` meta-steps old is dropped and counted.

A worker that dies mid-unroll is restarted by Ray (``max_restarts``) and its share is skipped until
it answers again (a non-blocking probe), so the learner never waits on it. It is dropped, with a
warning, once Ray has no restarts left for it (``ActorDiedError``, as opposed to the temporary
``ActorUnavailableError``), or once it has not answered for ``restart_timeout`` seconds: Ray waits
forever to restart a worker no node has room for, e.g. when its node is gone and its ``resources``
are nowhere else free.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import ray
from ray.exceptions import ActorDiedError, RayActorError, RayTaskError

from metaopt.config import Config, ConfigError, DistributedConfig
from metaopt.distributed.worker import SETUP_ERRORS, RolloutWorker, flatten, unflatten
from metaopt.meta.estimators import Estimate
from metaopt.meta.trainer import training_data
from metaopt.optimizers import MetaParams

# How long the learner pauses when every live worker is restarting, before asking again.
RESTART_POLL_SECONDS = 0.2
# Ray's own resources; the others in ray.cluster_resources() are custom ones or per-node markers.
RAY_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}
DIED = "it died and Ray has no restarts left for it (distributed.max_restarts)"


def worker_resources(dist: DistributedConfig, resources: dict[str, float]) -> dict[str, float]:
    """What one RolloutWorker reserves (``CPU``, ``GPU`` where it gets one, custom ``resources``), after checking
    that a cluster with ``resources`` (``ray.cluster_resources()``) can host every worker, before any is created."""
    for name, amount in dist.resources.items():
        need, have = dist.workers * amount, resources.get(name, 0.0)
        if need > have:
            custom = ", ".join(
                f"{key}={value:g}"
                for key, value in sorted(resources.items())
                if key not in RAY_RESOURCES and not key.startswith(("node:", "accelerator_type:"))
            )
            raise ConfigError(
                f"distributed.workers={dist.workers} × resources.{name}={amount:g} needs {need:g} {name} but "
                f"the Ray cluster has {have:g} (its custom resources: {custom or 'none'}); start nodes with "
                f"ray start --resources='{{\"{name}\": N}}', or change distributed.resources or workers"
            )
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if dist.workers * dist.num_cpus > cpus:
        raise ConfigError(
            f"distributed.workers={dist.workers} × num_cpus={dist.num_cpus} needs "
            f"{dist.workers * dist.num_cpus:g} CPUs but the Ray cluster has {cpus:g}; lower "
            "distributed.workers or distributed.num_cpus, or add nodes"
        )
    if dist.num_gpus == "auto":
        num_gpus = math.floor(min(1.0, gpus / dist.workers) * 1e4) / 1e4 if gpus else 0.0
    else:
        num_gpus = float(dist.num_gpus)
    if num_gpus > 0 and dist.workers * num_gpus > gpus:
        raise ConfigError(
            f"distributed.workers={dist.workers} × num_gpus={dist.num_gpus} needs "
            f"{dist.workers * dist.num_gpus:g} GPUs but the Ray cluster has {gpus:g}; set "
            "distributed.num_gpus: auto (or 0 on a cluster without GPUs), or a smaller fraction"
        )
    return {"CPU": float(dist.num_cpus), **({"GPU": num_gpus} if num_gpus else {}), **dist.resources}


class WorkerGroup:
    """``distributed.workers`` RolloutWorker actors behind the ``GradientSource`` interface."""

    def __init__(self, config: Config):
        config.require("optimizer", "train", "distributed")
        self.config = config
        dist = config.distributed
        reserved = worker_resources(dist, ray.cluster_resources())
        data = training_data(config)
        data_ref = ray.put(data) if data is not None else None  # once; Ray copies it to each node once
        actor = ray.remote(RolloutWorker).options(
            num_cpus=reserved["CPU"],
            num_gpus=reserved.get("GPU", 0.0),
            resources=dist.resources,
            max_restarts=dist.max_restarts,
            max_task_retries=0,
        )
        threads = max(1, int(dist.num_cpus))
        self.workers = [
            actor.remote(config.model_dump(), index, dist.workers, data_ref, threads) for index in range(dist.workers)
        ]
        self.alive = list(range(dist.workers))
        self.template = config.optimizer.build().init_meta_params(config.train.seed)
        self.version = 0  # meta-parameter broadcasts so far
        self.episodes = [0] * dist.workers  # each worker's latest episode, to continue after a restart
        self.down: dict[int, float] = {}  # last call failed -> since when: restarting, or back and due a fresh episode
        self.probes: dict[int, ray.ObjectRef] = {}  # down worker -> a where() call that answers once it is back
        self.last_nonfinite: set[int] = set()
        self.in_flight: dict[ray.ObjectRef, tuple[int, int]] = {}  # async: ref -> (worker, version)
        self.idle = set(self.alive)
        self.failures = self.stale_dropped = 0
        try:
            ray.get([w.where.remote() for w in self.workers])  # constructed (data loaded) before the clock starts
        except RayTaskError as error:
            self.close()
            if isinstance(error.cause, SETUP_ERRORS):
                raise error.cause from None
            raise

    # --- GradientSource -------------------------------------------------------------------------

    def estimate(self, meta_params: MetaParams) -> Estimate:
        self.version += 1
        started = time.perf_counter()
        params_ref = ray.put(flatten(meta_params))  # one broadcast per meta-step
        if self.config.distributed.mode == "sync":
            results = self._gather_sync(params_ref)
        else:
            results = [self._next_async(params_ref)]
        estimate = self._combine(results)
        if self.config.distributed.mode == "sync":  # learner time not spent waiting on the slowest unroll
            wall = time.perf_counter() - started
            estimate.stats["ray_overhead_fraction"] = max(0.0, wall - max(r["seconds"] for r in results)) / wall
        return estimate

    def reset_episode(self) -> None:
        """After a skipped meta-gradient: new episodes for the workers whose estimate was not finite."""
        for index in self.last_nonfinite or self.alive:
            self.workers[index].reset_episode.remote()

    def state_dict(self) -> dict:
        """Every live worker's carried optimizees (None for one that is restarting: it starts afresh)."""
        states = []
        for index in self.alive:
            if index in self.down:
                states.append(None)
                continue
            try:
                states.append(ray.get(self.workers[index].state_dict.remote()))
            except RayActorError:
                self._mark_down(index)
                states.append(None)
        return {"workers": states, "alive": list(self.alive), "started": self.config.distributed.workers}

    def load_state_dict(self, saved: dict) -> None:
        """The saved workers' optimizees, if this run has the same live workers with the same shares."""
        saved_states = saved.get("workers", [])
        started = saved.get("started", len(saved_states))  # checkpoints without it were saved with every worker
        if (saved.get("alive"), started) != (self.alive, self.config.distributed.workers):
            warnings.warn(
                f"the checkpoint's optimizee state is from {len(saved_states) or 'no'} Ray worker(s) (of {started} "
                f"started), this run has {len(self.alive)} (of {self.config.distributed.workers}): the "
                "meta-parameters and meta-optimizer resume exactly, the workers start fresh episodes",
                stacklevel=2,
            )
            return
        ray.get(
            [
                self.workers[i].load_state_dict.remote(state)
                for i, state in zip(self.alive, saved["workers"])
                if state is not None
            ]
        )

    # --- internals ------------------------------------------------------------------------------

    def _mark_down(self, index: int) -> None:
        if index not in self.down:  # a new failure, not a call made while Ray restarts it
            self.failures += 1
            self.down[index] = time.monotonic()

    def _drop(self, index: int, why: str) -> None:
        """Give up on worker ``index``: its share of the optimizees is skipped from now on."""
        ray.kill(self.workers[index])  # also withdraws a restart still waiting for a node
        self.alive.remove(index)
        self.idle.discard(index)
        self.probes.pop(index, None)
        if not self.alive:
            raise RuntimeError(
                f"every Ray RolloutWorker was dropped, the last because {why}; see the worker logs (ray logs, "
                "or the job's log), and raise distributed.max_restarts if they were preempted"
            )
        warnings.warn(
            f"dropped Ray RolloutWorker {index} because {why}; the run goes on with "
            f"{len(self.alive)} of {len(self.workers)} workers"
        )

    def _ready(self, index: int) -> bool:
        """Whether worker ``index`` can take work now; never blocks. A worker that failed is asked
        where it runs, and takes work again once Ray has restarted it and it answers."""
        if index not in self.down:
            return True
        if index not in self.probes:
            self.probes[index] = self.workers[index].where.remote()
        ready, _ = ray.wait([self.probes[index]], timeout=0)
        if ready:
            try:
                ray.get(self.probes.pop(index))
                return True
            except ActorDiedError:
                self._drop(index, DIED)
                return False
            except RayActorError:  # still restarting: ask again next time
                pass
        timeout = self.config.distributed.restart_timeout
        if time.monotonic() - self.down[index] > timeout:
            self._drop(
                index,
                f"it has not answered for {timeout:g} s since it failed (distributed.restart_timeout): "
                "no node may have room to restart it, e.g. its node is gone and its resources are nowhere else",
            )
        return False

    def _submit(self, index: int, params_ref: ray.ObjectRef) -> ray.ObjectRef:
        fresh_episode = self.episodes[index] + 1 if index in self.down else None
        ref = self.workers[index].compute.remote(params_ref, self.version, fresh_episode)
        self.in_flight[ref] = (index, self.version)
        return ref

    def _collect(self, ref: ray.ObjectRef) -> dict | None:
        """A finished computation's result, or None when its worker died (counted)."""
        index, _ = self.in_flight.pop(ref)
        try:
            result = ray.get(ref)
        except RayActorError as error:
            self._mark_down(index)
            if isinstance(error, ActorDiedError):
                self._drop(index, DIED)
            return None
        self.down.pop(index, None)
        self.episodes[index] = result["episode"]
        result["worker"] = index
        return result

    def _gather_sync(self, params_ref: ray.ObjectRef) -> list[dict]:
        while True:
            refs = [self._submit(i, params_ref) for i in list(self.alive) if self._ready(i)]
            results = [r for r in (self._collect(ref) for ref in refs) if r is not None]
            if results:  # the shares of workers that died or are restarting are skipped this meta-step
                return results
            time.sleep(RESTART_POLL_SECONDS)  # every live worker is restarting

    def _next_async(self, params_ref: ray.ObjectRef) -> dict:
        while True:
            for index in sorted(self.idle & set(self.alive)):
                if self._ready(index):
                    self._submit(index, params_ref)
                    self.idle.discard(index)
            if not self.in_flight:  # every live worker is restarting
                time.sleep(RESTART_POLL_SECONDS)
                continue
            [ref], _ = ray.wait(list(self.in_flight), num_returns=1)
            index, _ = self.in_flight[ref]
            result = self._collect(ref)
            self.idle.add(index)
            if result is None:
                continue
            staleness = self.version - result["version"]
            if staleness > self.config.distributed.max_staleness:
                self.stale_dropped += 1
                continue
            result["staleness"] = staleness
            return result

    def _combine(self, results: list[dict]) -> Estimate:
        """Average equal shares; report throughput, stragglers and faults."""
        grad = np.mean([r["grad"] for r in results], axis=0)
        seconds = [r["seconds"] for r in results]
        self.last_nonfinite = {r["worker"] for r in results if not r["finite"]}
        stats = {
            "workers_alive": float(len(self.alive)),
            "workers_reporting": float(len(results)),
            "worker_failures": float(self.failures),
            "worker_steps_per_s": float(np.mean([r["optimizee_steps"] / r["seconds"] for r in results])),
            "straggler_ratio": max(seconds) / statistics.median(seconds),
        }
        if self.config.distributed.mode == "async":
            stats |= {"stale_dropped": float(self.stale_dropped), "staleness": float(results[0]["staleness"])}
        return Estimate(
            grads=unflatten(grad, self.template, next(iter(self.template.values())).device),
            meta_loss=float(np.mean([r["meta_loss"] for r in results])),
            optimizee_steps=sum(r["optimizee_steps"] for r in results),
            stats=stats,
        )

    def worker_places(self) -> list[tuple[int, str]]:
        """Each live worker's process ID and Ray node ID."""
        return ray.get([self.workers[i].where.remote() for i in self.alive])

    def worker_pids(self) -> list[int]:
        return [pid for pid, _ in self.worker_places()]

    def close(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        self.workers, self.in_flight = [], {}


@contextmanager
def ray_connection(address: str | None = None) -> Iterator[None]:
    """Connect to Ray unless already connected, and disconnect afterwards only if this connected.

    ``address``: a cluster address; without one, ``RAY_ADDRESS``, then a cluster started with
    ``ray start`` on this machine, else a local Ray for this run.
    """
    connect = not ray.is_initialized()
    if connect:
        ray.init(address=address, logging_level="WARNING")
    try:
        yield
    finally:
        if connect:
            ray.shutdown()


@contextmanager
def ray_workers(config: Config, address: str | None = None) -> Iterator[WorkerGroup]:
    """Start the workers on the cluster of ``ray_connection(address or distributed.address)``;
    stop what this started."""
    with ray_connection(address or config.distributed.address):
        group = WorkerGroup(config)
        try:
            yield group
        finally:
            group.close()
