"""The MLflow Model Registry for trained optimizers, and ``load_optimizer`` for users.

A registered optimizer is an MLflow pyfunc model (logged from code, pickle-free) whose artifacts
hold the checkpoint (``optimizer.safetensors`` + ``spec.json``), the meta-training config and the
evaluation table. Versions are promoted with aliases (``latest``, ``candidate``, ``production``),
never the deprecated stages.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

from metaopt import __version__
from metaopt.meta.checkpoint import SPEC, CheckpointError, load_checkpoint

MODEL_ARTIFACT = "optimizer"  # the model's name inside its run
CODE = Path(__file__).with_name("pyfunc_model.py")
LATEST = "latest"  # MLflow's reserved alias: always the newest version


class RegistryError(LookupError):
    """A registered model, version or alias does not exist, or is not a metaopt optimizer."""


def log_optimizer_model(run_id: str, checkpoint: Path, extra_artifacts: dict[str, Path] | None = None,
                        tracking_uri: str | None = None) -> str:
    """Log ``checkpoint`` as the run's pyfunc model; return its model URI."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    artifacts = {"checkpoint": str(_weights_only_copy(checkpoint))}
    artifacts |= {name: str(path) for name, path in (extra_artifacts or {}).items() if Path(path).exists()}
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT, python_model=str(CODE), artifacts=artifacts,
            pip_requirements=[f"metaopt=={__version__}"],
        )
    return info.model_uri


def _weights_only_copy(checkpoint: Path) -> Path:
    """The checkpoint's weights and spec, without the trainer state a user never needs."""
    copy = Path(tempfile.mkdtemp(prefix="metaopt-model-")) / "checkpoint"
    copy.mkdir()
    for name in ("optimizer.safetensors", SPEC):
        shutil.copy2(Path(checkpoint) / name, copy / name)
    return copy


def register_optimizer(model_uri: str, name: str, alias: str | None = None, tags: dict[str, Any] | None = None,
                       tracking_uri: str | None = None) -> int:
    """Register ``model_uri`` as a new version of ``name`` (with ``alias`` and version ``tags``).

    ``latest`` is MLflow's reserved alias for the newest version: it needs no setting."""
    import mlflow
    from mlflow import MlflowClient

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in (tags or {}).items()})
    if alias and alias.lower() != LATEST:
        MlflowClient(tracking_uri).set_registered_model_alias(name, alias, version.version)
    return int(version.version)


def register_run(run_id: str, name: str, alias: str | None = None, tracking_uri: str | None = None,
                 run_dir: Path | None = None, **tags: Any) -> int:
    """Log run ``run_id``'s best checkpoint (with its config and evaluation table) as an optimizer model
    and register it as a new version of ``name``. Files come from ``run_dir`` when given, else from
    the run's artifacts."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise RegistryError(f"no MLflow run {run_id!r} at {client.tracking_uri}") from None
    if run_dir is None:
        run_dir = Path(tempfile.mkdtemp(prefix="metaopt-run-"))
        for path in ("checkpoints/best", "config.yaml", "evaluation/table.md"):
            try:
                client.download_artifacts(run_id, path, str(run_dir))
            except (MlflowException, OSError):
                if path == "checkpoints/best":
                    raise RegistryError(f"run {run_id} has no checkpoints/best artifact: it is not a metaopt "
                                        "meta-training run, or it never finished") from None
    run_dir = Path(run_dir)
    model_uri = log_optimizer_model(
        run_id, run_dir / "checkpoints" / "best",
        {"config": run_dir / "config.yaml", "evaluation": run_dir / "evaluation" / "table.md"}, tracking_uri)
    tags = {"metaopt.version": __version__, "run_name": run.info.run_name, **tags}
    return register_optimizer(model_uri, name, alias, tags, tracking_uri)


def promote(name: str, version: int, alias: str, tracking_uri: str | None = None) -> None:
    from mlflow import MlflowClient

    if alias.lower() == LATEST:
        raise RegistryError("'latest' is MLflow's reserved alias for the newest version; choose another "
                            "alias, such as candidate or production")
    client = MlflowClient(tracking_uri)
    _version(client, name, str(version))
    client.set_registered_model_alias(name, alias, str(version))


def list_models(tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Every registered model: name, latest version, aliases."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    rows = []
    for model in client.search_registered_models():
        versions = client.search_model_versions(f"name = '{model.name}'")
        rows.append({"name": model.name, "versions": len(versions),
                     "latest_version": max((int(v.version) for v in versions), default=None),
                     "aliases": dict(model.aliases)})
    return rows


def show_model(name: str, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Every version of ``name``: version, aliases, tags, source run."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    model = _model(client, name)
    aliases_of: dict[str, list[str]] = {}
    for alias, version in model.aliases.items():
        aliases_of.setdefault(str(version), []).append(alias)
    versions = client.search_model_versions(f"name = '{name}'")
    return [{"version": int(v.version), "aliases": sorted(aliases_of.get(str(v.version), [])), "run_id": v.run_id,
             "tags": dict(v.tags)} for v in sorted(versions, key=lambda v: int(v.version))]


def pull(source: str, directory: Path, tracking_uri: str | None = None) -> Path:
    """Download ``source``'s checkpoint (weights + spec) into ``directory``; return the checkpoint folder."""
    checkpoint = resolve_checkpoint(source, tracking_uri)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for item in checkpoint.iterdir():
        shutil.copy2(item, directory / item.name)
    return directory


def resolve_checkpoint(source: str | Path, tracking_uri: str | None = None) -> Path:
    """A local checkpoint folder for ``source``: a folder, ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``
    or ``runs:/RUN_ID/...``."""
    text = str(source)
    if not text.startswith(("models:/", "runs:/")):
        path = Path(text).expanduser()
        if not path.is_dir():
            raise CheckpointError(f"{path} is not a checkpoint folder, and not a models:/ or runs:/ URI")
        return path
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    if text.startswith("models:/") and not text.startswith("models:/m-"):
        _check_registered(client, text.removeprefix("models:/"))
    target = Path(tempfile.mkdtemp(prefix="metaopt-pull-"))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=text, dst_path=str(target),
                                                         tracking_uri=tracking_uri))
    except MlflowException as error:
        raise RegistryError(f"cannot download {text} from {client.tracking_uri}: {error.message}") from None
    found = [p.parent for p in local.rglob(SPEC)] if local.is_dir() else []
    if not found:
        raise RegistryError(f"{text} is not a metaopt optimizer: it holds no checkpoint ({SPEC} and weights)")
    return found[0]


def _check_registered(client, reference: str) -> None:
    """Clear errors for an unknown model name, alias or version."""
    name, _, version = reference.partition("/")
    name, _, alias = name.partition("@")
    model = _model(client, name)
    if alias and alias.lower() != LATEST and alias not in model.aliases:
        known = ", ".join(f"@{a} (version {v})" for a, v in model.aliases.items()) or "none"
        raise RegistryError(f"registered model {name!r} has no alias {alias!r}; its aliases: {known}. "
                            f"Set one with `metaopt registry promote {name} VERSION {alias}`")
    if version:
        _version(client, name, version)


def _model(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException:
        names = [m.name for m in client.search_registered_models()]
        raise RegistryError(f"no registered model {name!r} at {client.tracking_uri}; registered: "
                            f"{', '.join(names) or 'none'}") from None


def _version(client, name: str, version: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, version)
    except MlflowException:
        versions = [str(v.version) for v in client.search_model_versions(f"name = '{name}'")]
        raise RegistryError(f"registered model {name!r} has no version {version}; versions: "
                            f"{', '.join(sorted(versions, key=int)) or 'none'}") from None


def load_optimizer(source: str | Path, params: Iterable, tracking_uri: str | None = None, **options: Any):
    """A ``torch.optim.Optimizer`` that steps ``params`` with the trained optimizer at ``source``.

    ``source``: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID/optimizer`` or a local
    checkpoint folder. ``options`` go to ``LearnedOptimizer`` (e.g. ``lr``, a multiplier on the
    learned updates, 1.0 as trained; ``horizon``, the steps of the run for a learned step schedule).
    """
    from metaopt.optimizers.torch_optim import LearnedOptimizer

    optimizer, meta_params, _ = load_checkpoint(resolve_checkpoint(source, tracking_uri))
    return LearnedOptimizer(params, optimizer, meta_params, **options)
