"""Checkpoint folders: learned-optimizer weights (safetensors), a JSON spec, and trainer state.

A checkpoint is written to a temporary folder and renamed into place, so a crash mid-write
never damages the last complete one. Nothing is unpickled on load: weights come from
safetensors and trainer state from ``torch.load(weights_only=True)``. The spec records the SHA-256
of both files, and every load checks it, so a damaged or altered file is refused, never used.

    meta_step_000050/
      optimizer.safetensors   meta-parameters
      spec.json               kind, hyperparameters, metaopt version, task, meta-step, the files' SHA-256
      trainer_state.pt        meta-optimizer state and the optimizees in flight (for --resume)
"""

from __future__ import annotations

import hashlib
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
DIGEST_KEY = "sha256"  # spec.json: the SHA-256 of optimizer.safetensors
STATE_DIGEST_KEY = "trainer_state_sha256"  # spec.json: the SHA-256 of trainer_state.pt


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
    spec[DIGEST_KEY] = sha256(partial / WEIGHTS)
    if trainer_state is not None:
        torch.save(trainer_state, partial / TRAINER_STATE)
        spec[STATE_DIGEST_KEY] = sha256(partial / TRAINER_STATE)
    (partial / SPEC).write_text(json.dumps(spec, indent=2))
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


def sha256(file: Path) -> str:
    """The hex SHA-256 of ``file``."""
    with open(file, "rb") as opened:
        return hashlib.file_digest(opened, "sha256").hexdigest()


def verify_file(path: Path, file: str, expected: str | None, what: str, remedy: str, by: str = "recorded") -> None:
    """Raise ``CheckpointError`` unless checkpoint ``path``'s ``file`` has SHA-256 ``expected`` (None: unrecorded,
    as in checkpoints from before digests were recorded); ``by`` says who recorded it."""
    if not expected:
        return
    try:
        actual = sha256(Path(path) / file)
    except OSError as error:
        raise CheckpointError(f"{what}: cannot read {file} ({error})") from None
    if actual != expected:
        raise CheckpointError(
            f"{what}: {file} does not match its {by} SHA-256 (expected {expected}, found {actual}); "
            f"the file was altered or damaged: {remedy}"
        )


def trained_on(spec: dict[str, Any]) -> str:
    """What a checkpoint's optimizer was meta-trained on, in words: its task kind, or its mixture's kinds."""
    mixture = (spec.get("train") or {}).get("tasks")
    if mixture:
        return "a mixture of " + ", ".join(dict.fromkeys(entry["task"]["kind"] for entry in mixture))
    return (spec.get("task") or {}).get("kind", "tasks it does not record")


def resume_paths(path: Path, output: Path | None = None) -> tuple[Path, Path]:
    """The checkpoint to continue from and the run folder to continue in, for ``--resume path [--output output]``.

    ``path`` is a run folder (its latest checkpoint) or a checkpoint folder; the run continues in ``output``
    when given (a new or empty folder, or that run's own), else in the run folder ``path`` is or lies in
    (``RUN/checkpoints/NAME``). Anything else raises ``CheckpointError``, before anything is written."""
    path = Path(path)
    if (path / SPEC).is_file():
        checkpoint, home = path, path.parent.parent if path.parent.name == "checkpoints" else None
    elif list_checkpoints(path / "checkpoints"):
        checkpoint, home = list_checkpoints(path / "checkpoints")[-1], path
    elif path.name == "checkpoints" and list_checkpoints(path):
        checkpoint, home = list_checkpoints(path)[-1], path.parent
    else:
        raise CheckpointError(
            f"--resume {path}: not a metaopt run folder (one with checkpoints/{PREFIX}*) nor a checkpoint "
            f"folder (one with {SPEC}); pass the folder `metaopt train` wrote to, or one of its checkpoints"
        )
    if output is not None:
        output = Path(output)
        if output.exists() and (not output.is_dir() or any(output.iterdir())) and not _same(output, home):
            raise CheckpointError(
                f"--output {output} already holds files; to continue {checkpoint} in a new run, name a new or "
                "empty folder (or its own run folder)"
            )
        return checkpoint, output
    if home is None or not (home / "checkpoints").is_dir():
        raise CheckpointError(
            f"--resume {path}: this checkpoint is not inside a metaopt run folder (RUN/checkpoints/NAME), so there "
            "is no run to continue; pass --output DIR to continue it in a new run folder"
        )
    return checkpoint, home


def _same(a: Path, b: Path | None) -> bool:
    return b is not None and b.exists() and a.resolve() == b.resolve()


def read_spec(path: Path) -> dict[str, Any]:
    """The JSON spec of checkpoint folder ``path``."""
    spec_file = Path(path) / SPEC
    if not spec_file.is_file():
        raise CheckpointError(f"{path} is not a metaopt checkpoint: it has no {SPEC} (expected {WEIGHTS} and {SPEC})")
    try:
        spec = json.loads(spec_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"checkpoint {path} is corrupt: {SPEC} is not valid JSON ({error})") from None
    if not isinstance(spec, dict):
        raise CheckpointError(
            f"checkpoint {path} is corrupt: {SPEC} holds a JSON {type(spec).__name__}, not an object with the "
            "optimizer's kind and hyperparameters"
        )
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
    verify_file(path, WEIGHTS, spec.get(DIGEST_KEY), f"checkpoint {path}", "restore it from a copy, or retrain")
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
        state = torch.load(state_file, weights_only=True, map_location="cpu")
    except Exception as error:  # torch raises RuntimeError/UnpicklingError/EOFError for damaged files
        raise CheckpointError(f"checkpoint {path} is corrupt: cannot read {TRAINER_STATE} ({error})") from None
    expected = read_spec(path).get(STATE_DIGEST_KEY)
    verify_file(path, TRAINER_STATE, expected, f"checkpoint {path}", "resume from an earlier checkpoint")
    return state
