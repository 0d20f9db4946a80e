"""Checkpoint folders: learned-optimizer weights (safetensors), a JSON spec, and trainer state.

A checkpoint is written to a temporary folder and renamed into place, so a crash mid-write
never damages the last complete one. Nothing is unpickled on load: weights come from
safetensors and trainer state from ``torch.load(weights_only=True)``.

    meta_step_000050/
      optimizer.safetensors   meta-parameters
      spec.json               kind, hyperparameters, metaopt version, task, meta-step
      trainer_state.pt        meta-optimizer state and the optimizees in flight (for --resume)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from metaopt import __version__
from metaopt.optimizers import LEARNED, MetaParams, Optimizer, make_optimizer

WEIGHTS, SPEC, TRAINER_STATE = "optimizer.safetensors", "spec.json", "trainer_state.pt"
PREFIX = "meta_step_"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match what it is loaded into."""


def save_checkpoint(
    directory: Path,
    meta_step: int,
    optimizer: Optimizer,
    meta_params: MetaParams,
    trainer_state: dict[str, Any] | None = None,
    extra_spec: dict[str, Any] | None = None,
    keep: int | None = None,
    name: str | None = None,
) -> Path:
    """Write ``directory/meta_step_NNNNNN`` (or ``directory/name``) atomically; keep only the
    newest ``keep`` meta-step checkpoints."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / (name or f"{PREFIX}{meta_step:06d}")
    partial = directory / f".partial-{final.name}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in meta_params.items()}, str(partial / WEIGHTS))
    spec = {**optimizer.spec(), "metaopt_version": __version__, "meta_step": meta_step, **(extra_spec or {})}
    (partial / SPEC).write_text(json.dumps(spec, indent=2))
    if trainer_state is not None:
        torch.save(trainer_state, partial / TRAINER_STATE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    if keep:
        for old in list_checkpoints(directory)[:-keep]:
            shutil.rmtree(old)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints under ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def read_spec(path: Path) -> dict[str, Any]:
    """The JSON spec of checkpoint folder ``path``."""
    spec_file = Path(path) / SPEC
    if not spec_file.is_file():
        raise CheckpointError(f"{path} is not a metaopt checkpoint: it has no {SPEC} (expected {WEIGHTS} and {SPEC})")
    try:
        spec = json.loads(spec_file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"checkpoint {path} is corrupt: {SPEC} is not valid JSON ({error})") from None
    if spec.get("kind") not in LEARNED:
        raise CheckpointError(
            f"checkpoint {path} holds kind {spec.get('kind')!r}, not a learned optimizer ({', '.join(LEARNED)})"
        )
    return spec


def load_checkpoint(path: str | Path) -> tuple[Optimizer, MetaParams, dict[str, Any]]:
    """The learned optimizer, its meta-parameters and the spec saved in checkpoint folder ``path``."""
    path = Path(path)
    spec = read_spec(path)
    try:
        optimizer = make_optimizer(spec["kind"], **spec.get("hyperparameters", {}))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} has hyperparameters this metaopt cannot build: {error}") from None
    try:
        meta_params = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError, FileNotFoundError) as error:
        raise CheckpointError(f"checkpoint {path} is corrupt: cannot read {WEIGHTS} ({error})") from None
    check_meta_params(optimizer, meta_params, str(path))
    order = optimizer.init_meta_params(0)  # safetensors sorts names; keep the network's order
    return optimizer, {name: meta_params[name] for name in order}, spec


def check_meta_params(optimizer: Optimizer, meta_params: MetaParams, source: str) -> None:
    """Raise ``CheckpointError`` unless ``meta_params`` has exactly the optimizer's names and shapes."""
    expected = {k: tuple(v.shape) for k, v in optimizer.init_meta_params(0).items()}
    found = {k: tuple(v.shape) for k, v in meta_params.items()}
    if expected != found:
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        shapes = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        raise CheckpointError(
            f"{source} does not match optimizer {optimizer!r}: missing {missing or 'none'}, "
            f"unexpected {unexpected or 'none'}, wrong shapes {[(k, found[k], expected[k]) for k in shapes] or 'none'}"
        )


def load_trainer_state(path: Path) -> dict[str, Any]:
    """The trainer state of checkpoint ``path``, loaded without unpickling arbitrary objects."""
    state_file = Path(path) / TRAINER_STATE
    if not state_file.is_file():
        raise CheckpointError(f"checkpoint {path} has no {TRAINER_STATE}, so training cannot resume from it")
    try:
        return torch.load(state_file, weights_only=True, map_location="cpu")
    except Exception as error:  # torch raises RuntimeError/UnpicklingError/EOFError for damaged files
        raise CheckpointError(f"checkpoint {path} is corrupt: cannot read {TRAINER_STATE} ({error})") from None
