"""The RolloutWorker: one Ray actor owning a share of every episode's optimizees.

It runs the same estimator as the single-process trainer (``metaopt.meta``) on its share, so there
is one implementation of the unroll and the estimators. Meta-parameters come in and the
meta-gradient goes out as flat float32 NumPy arrays.
"""

from __future__ import annotations

import os
import time
import warnings

import numpy as np
import torch

from metaopt.config import ConfigError, resolve_device, validate_config
from metaopt.meta.trainer import share_estimator, to_device, training_tasks
from metaopt.optimizers import MetaParams
from metaopt.tasks import DataNotFoundError, TaskFactoryError

# What a worker's own setup can find wrong with the config or its machine (a device, data, a task factory): kept
# and raised by ``where``, so the learner reports it in one line instead of Ray's actor-death traceback.
SETUP_ERRORS = (ConfigError, DataNotFoundError, TaskFactoryError)


def flatten(meta_params: MetaParams) -> np.ndarray:
    """Meta-parameters (or their gradients) as one flat float32 array, in the network's order."""
    return torch.cat([v.detach().reshape(-1).float().cpu() for v in meta_params.values()]).numpy()


def unflatten(flat: np.ndarray, like: MetaParams, device: torch.device | str = "cpu") -> MetaParams:
    """The inverse of ``flatten``: tensors shaped like ``like``'s."""
    expected = sum(value.numel() for value in like.values())
    if flat.size != expected:
        raise ValueError(f"flat array has {flat.size} values; the optimizer has {expected} meta-parameters")
    tensor = torch.from_numpy(np.array(flat, dtype=np.float32, copy=True)).to(device)
    sizes = [value.numel() for value in like.values()]
    return {
        name: chunk.reshape(value.shape).to(value.dtype)
        for (name, value), chunk in zip(like.items(), tensor.split(sizes))
    }


def as_tensors(data):
    """NumPy arrays as tensors (no copy), through the lists and tuples of ``training_data``."""
    if isinstance(data, np.ndarray):
        return torch.from_numpy(data)
    if isinstance(data, list | tuple):
        return type(data)(as_tensors(item) for item in data)
    return data


class RolloutWorker:
    """Worker ``worker`` of ``workers``: estimates meta-gradients on its share of the optimizees.

    ``data`` is the task's meta-train data as NumPy arrays from the object store (read-only,
    zero-copy on CPU), or None for tasks without data.
    """

    def __init__(self, config_data: dict, worker: int, workers: int, data, num_threads: int):
        self.setup_error: Exception | None = None
        try:
            self._setup(config_data, worker, workers, data, num_threads)
        except SETUP_ERRORS as error:
            self.setup_error = error

    def _setup(self, config_data: dict, worker: int, workers: int, data, num_threads: int) -> None:
        torch.set_num_threads(num_threads)
        torch.set_flush_denormal(True)  # as MetaTrainer: subnormal floats are slow on x86 CPUs
        config = validate_config(config_data, source="the learner's config")
        self.worker = worker
        self.device = self._device(config.device)
        self.optimizer = config.optimizer.build()
        self.template = self.optimizer.init_meta_params(config.train.seed)
        with warnings.catch_warnings():  # object-store arrays are read-only; the tasks never write them
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            data = as_tensors(data)
        tasks = training_tasks(config, self.device, data, worker)
        self.estimator = share_estimator(config, tasks, self.optimizer, worker, workers)

    @staticmethod
    def _device(device: str) -> torch.device:
        """``auto`` is the GPU Ray assigned this actor, if any; otherwise as configured."""
        if device == "auto":
            import ray

            return torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")
        return resolve_device(device)

    def compute(self, flat_meta_params: np.ndarray, version: int, fresh_episode: int | None = None) -> dict:
        """One truncation's meta-gradient for the broadcast meta-parameters of ``version``.

        ``fresh_episode``: first continue at this new episode (after a restart, so no optimizee
        share is repeated).
        """
        started = time.perf_counter()
        if fresh_episode is not None:
            self.estimator.episode, self.estimator.state = fresh_episode, None
        meta_params = unflatten(flat_meta_params, self.template, self.device)
        estimate = self.estimator.estimate(meta_params)
        grad = flatten(estimate.grads)
        return {
            "grad": grad,
            "meta_loss": estimate.meta_loss,
            "optimizee_steps": estimate.optimizee_steps,
            "seconds": time.perf_counter() - started,
            "version": version,
            "episode": self.estimator.episode,
            "finite": bool(np.isfinite(grad).all() and np.isfinite(estimate.meta_loss)),
        }

    def reset_episode(self) -> None:
        self.estimator.reset_episode()

    def state_dict(self) -> dict:
        return to_device(self.estimator.state_dict(), torch.device("cpu"))

    def load_state_dict(self, saved: dict) -> None:
        self.estimator.load_state_dict(to_device(saved, self.device))

    def where(self) -> tuple[int, str]:
        """This worker's process ID and Ray node ID; what its setup found wrong, raised."""
        import ray

        if self.setup_error is not None:
            raise self.setup_error
        return os.getpid(), ray.get_runtime_context().get_node_id()
