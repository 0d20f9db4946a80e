"""The MLflow Model Registry for trained optimizers (``metaopt.load_optimizer`` loads through ``resolve_checkpoint``).

A registered optimizer is an MLflow pyfunc model (logged from code, pickle-free) whose artifacts
hold the checkpoint (``optimizer.safetensors`` + ``spec.json``), the meta-training config and the
evaluation table. Versions are promoted with aliases (``latest``, ``candidate``, ``production``),
never the deprecated stages. Registration records the SHA-256 of the weights (version tag
``metaopt.sha256``, and ``sha256`` in the logged ``spec.json``); every load checks it.

Loads are cached under ``cache_root()``, a registered model by name and version number: an alias
is resolved on the server at every load, so a newly promoted version is picked up, while a
version, a run's artifact or a logged model, once cached, loads with no server at all.

A ``tracking_uri`` given to any function here is used for tracking and for the registry alike, and
no global MLflow setting is read in its place.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from metaopt import __version__
from metaopt.meta.checkpoint import (
    DIGEST_KEY,
    SPEC,
    STATE_DIGEST_KEY,
    WEIGHTS,
    CheckpointError,
    read_spec,
    sha256,
    trained_on,
    verify_file,
)
from metaopt.tracking.tracker import artifact_location, bound_http_requests

MODEL_ARTIFACT = "optimizer"  # the model's name inside its run
CODE = Path(__file__).with_name("pyfunc_model.py")
LATEST = "latest"  # MLflow's reserved alias: always the newest version
PRETRAINED_PREFIX = "pretrained:"
PRETRAINED = Path(__file__).resolve().parents[1] / "pretrained"  # optimizers shipped in the package
DIGEST_TAG = "metaopt.sha256"  # model-version tag: the SHA-256 of the registered weights
ABSENT = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}  # MLflow's answers for an unknown name
LOAD_DEADLINE_S = 25.0  # the most a load from a server may take, however slow the server or busy the machine


class RegistryError(LookupError):
    """A registered model, version or alias does not exist, is not a metaopt optimizer, or the
    tracking server cannot be reached or refuses the credentials."""


def cache_root() -> Path:
    """The pulled models' cache: ``registry`` in metaopt's cache folder (``cache_dir``)."""
    from metaopt.optimizers.native import cache_dir

    return cache_dir("registry")


def weights_sha256(checkpoint: Path) -> str:
    """The hex SHA-256 of checkpoint folder ``checkpoint``'s weights file."""
    return sha256(Path(checkpoint) / WEIGHTS)


def _client(tracking_uri: str | None):
    """An ``MlflowClient`` on ``tracking_uri`` for tracking and the registry (MLflow's defaults where None)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri, registry_uri=tracking_uri)


def _point_mlflow_at(tracking_uri: str | None) -> None:
    """MLflow's fluent API (``mlflow.pyfunc.log_model``, ``mlflow.register_model``) on ``tracking_uri`` for
    tracking and the registry, as ``mlflow.set_tracking_uri`` sets it: for the rest of the process."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)


def check_name(name: str, alias: str | None = None) -> None:
    """Raise ``RegistryError`` unless MLflow takes ``name`` as a registered model's name and ``alias`` as an alias."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_alias_name, _validate_model_name

    try:
        _validate_model_name(name)
        if alias and alias.lower() != LATEST:
            _validate_model_alias_name(alias)
    except MlflowException as error:
        raise RegistryError(
            f"cannot register {name!r}" + (f" as @{alias}" if alias else "") + f": {error.message} "
            "(a name like quadratic-phnn; an alias of letters, digits, - and _, like production)"
        ) from None


def _within_deadline(call: Callable[[], Path], uri: str) -> Path:
    """``call()``'s result, or ``RegistryError`` once it has run ``LOAD_DEADLINE_S`` seconds: a server that
    accepts connections and never answers holds only a background thread, which MLflow's own timeouts end."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as error:  # handed to the caller below
            outcome["error"] = error

    started = time.monotonic()
    thread = threading.Thread(target=run, name="metaopt-registry-load", daemon=True)
    thread.start()
    thread.join(LOAD_DEADLINE_S)
    if thread.is_alive():
        raise RegistryError(
            f"the MLflow tracking server at {uri} did not answer within {time.monotonic() - started:.0f} s; check "
            "that it is running and that --tracking-uri (or MLFLOW_TRACKING_URI) names it (a version loaded "
            "before, models:/NAME/VERSION, loads from the cache without it)"
        )
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@contextmanager
def _server(uri: str):
    """Requests to the tracking server at ``uri`` with bounded HTTP retries; an unreachable server or
    refused credentials raise ``RegistryError``."""
    import requests
    from mlflow.exceptions import MlflowException

    bound_http_requests()
    try:
        yield
    except (MlflowException, requests.RequestException) as error:
        refused = _access_error(error, uri)
        if refused is None:
            raise
        raise refused from None


def _access_error(error: Exception, uri: str) -> RegistryError | None:
    """What ``error`` says when the server at ``uri`` cannot be reached or refuses the credentials, else None."""
    import requests
    from mlflow.utils.credentials import read_mlflow_creds

    cause = error
    while cause is not None and not isinstance(cause, (requests.ConnectionError, requests.Timeout)):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        reason = getattr(cause.args[0], "reason", cause) if cause.args else cause  # urllib3's, after retries
        return RegistryError(
            f"the MLflow tracking server at {uri} cannot be reached ({str(reason).rsplit(': ', 1)[-1]}); check "
            "that it is running and that --tracking-uri (or MLFLOW_TRACKING_URI) names it (a version loaded "
            "before, models:/NAME/VERSION, loads from the cache without it)"
        )
    code = getattr(error, "error_code", None)
    user = read_mlflow_creds().username
    if code in ("UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED"):
        return RegistryError(
            f"the MLflow tracking server at {uri} refused authentication "
            f"({f'user {user!r}: wrong password, or no such user' if user else 'no credentials given'}); "
            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user of that server"
        )
    if code == "PERMISSION_DENIED":
        return RegistryError(
            f"the MLflow tracking server at {uri} denied user {user!r} this request; ask its admin for the "
            "permission, or set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user who has it"
        )
    return None


def log_optimizer_model(
    run_id: str, checkpoint: Path, extra_artifacts: dict[str, Path] | None = None, tracking_uri: str | None = None
) -> str:
    """Log ``checkpoint`` as the run's pyfunc model; return its model URI."""
    import mlflow

    _point_mlflow_at(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="metaopt-model-") as folder:
        artifacts = {"checkpoint": str(_weights_only_copy(Path(checkpoint), Path(folder)))}
        artifacts |= {name: str(path) for name, path in (extra_artifacts or {}).items() if Path(path).exists()}
        with _server(mlflow.get_tracking_uri()), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                python_model=str(CODE),
                artifacts=artifacts,
                pip_requirements=[f"metaopt=={__version__}"],
            )
    return info.model_uri


def _weights_only_copy(checkpoint: Path, folder: Path) -> Path:
    """The checkpoint's weights and spec (with the weights' SHA-256) in ``folder``, without the trainer
    state a user never needs."""
    copy = folder / "checkpoint"
    copy.mkdir()
    shutil.copy2(checkpoint / WEIGHTS, copy / WEIGHTS)
    spec = {**read_spec(checkpoint), DIGEST_KEY: weights_sha256(copy)}
    spec.pop(STATE_DIGEST_KEY, None)  # the trainer state stays behind
    (copy / SPEC).write_text(json.dumps(spec, indent=2))
    return copy


def register_optimizer(
    model_uri: str,
    name: str,
    alias: str | None = None,
    tags: dict[str, Any] | None = None,
    tracking_uri: str | None = None,
) -> int:
    """Register ``model_uri`` as a new version of ``name`` (with ``alias`` and version ``tags``).

    ``latest`` is MLflow's reserved alias for the newest version: it needs no setting."""
    import mlflow

    check_name(name, alias)
    client = _client(tracking_uri)
    _point_mlflow_at(tracking_uri)
    with _server(client.tracking_uri):
        version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in (tags or {}).items()})
        if alias and alias.lower() != LATEST:
            client.set_registered_model_alias(name, alias, version.version)
    return int(version.version)


def register_run(
    run_id: str,
    name: str,
    alias: str | None = None,
    tracking_uri: str | None = None,
    run_dir: Path | None = None,
    **tags: Any,
) -> int:
    """Log run ``run_id``'s best checkpoint (with its config and evaluation table) as an optimizer model
    and register it as a new version of ``name``. Files come from ``run_dir`` when given, else from
    the run's artifacts."""
    from mlflow.exceptions import MlflowException

    check_name(name, alias)
    client = _client(tracking_uri)
    with _server(client.tracking_uri), tempfile.TemporaryDirectory(prefix="metaopt-run-") as download:
        try:
            run = client.get_run(run_id)
        except MlflowException as error:
            if error.error_code not in ABSENT:
                raise
            raise RegistryError(f"no MLflow run {run_id!r} at {client.tracking_uri}") from None
        if run_dir is None:
            run_dir = Path(download)
            for path in ("checkpoints/best", "config.yaml", "evaluation/table.md"):
                target = (run_dir / path).parent  # MLflow downloads into target / the path's last part
                target.mkdir(parents=True, exist_ok=True)
                try:
                    client.download_artifacts(run_id, path, str(target))
                except (MlflowException, OSError):
                    if path == "checkpoints/best":
                        raise RegistryError(
                            f"run {run_id} has no checkpoints/best artifact: it is not a metaopt "
                            "meta-training run, or it never finished"
                        ) from None
        run_dir = Path(run_dir)
        checkpoint = run_dir / "checkpoints" / "best"
        model_uri = log_optimizer_model(
            run_id,
            checkpoint,
            {"config": run_dir / "config.yaml", "evaluation": run_dir / "evaluation" / "table.md"},
            tracking_uri,
        )
        tags = {
            "metaopt.version": __version__,
            "run_name": run.info.run_name,
            DIGEST_TAG: weights_sha256(checkpoint),
            **tags,
        }
        return register_optimizer(model_uri, name, alias, tags, tracking_uri)


def register_checkpoint(
    source: str | Path,
    name: str,
    alias: str | None = None,
    tracking_uri: str | None = None,
    experiment: str = "metaopt-registered",
) -> int:
    """Register ``pretrained:NAME`` or a checkpoint folder as a new version of ``name``: logged as the
    optimizer model of a new run (named after ``source``, its spec's hyperparameters as params) in
    ``experiment``, so a registry holds optimizers that were meta-trained elsewhere."""
    from mlflow.entities import Param

    check_name(name, alias)
    checkpoint = resolve_checkpoint(source)
    spec = read_spec(checkpoint)
    client = _client(tracking_uri)  # not mlflow.set_experiment: the caller's active experiment stays
    with _server(client.tracking_uri):
        found = client.get_experiment_by_name(experiment)
        location = artifact_location(client.tracking_uri, experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment, location)
        run = client.create_run(experiment_id, run_name=str(source))
        params = {"kind": spec["kind"], **spec.get("hyperparameters", {})}
        client.log_batch(run.info.run_id, params=[Param(key, str(value)) for key, value in params.items()])
        client.set_terminated(run.info.run_id)
    model_uri = log_optimizer_model(run.info.run_id, checkpoint, tracking_uri=tracking_uri)
    tags = {
        "metaopt.version": __version__,
        "source": str(source),
        "task": trained_on(spec),
        **({"heldout_loss": spec["heldout_loss"]} if "heldout_loss" in spec else {}),
        DIGEST_TAG: weights_sha256(checkpoint),
    }
    return register_optimizer(model_uri, name, alias, tags, tracking_uri)


def promote(name: str, version: int, alias: str, tracking_uri: str | None = None) -> None:
    if alias.lower() == LATEST:
        raise RegistryError(
            "'latest' is MLflow's reserved alias for the newest version; choose another "
            "alias, such as candidate or production"
        )
    check_name(name, alias)
    client = _client(tracking_uri)
    with _server(client.tracking_uri):
        _registered_version(client, name, version=str(version))
        client.set_registered_model_alias(name, alias, str(version))


def list_models(tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Every registered model: name, latest version, aliases."""
    client = _client(tracking_uri)
    rows = []
    with _server(client.tracking_uri):
        for model in client.search_registered_models():
            versions = client.search_model_versions(f"name = '{model.name}'")
            rows.append(
                {
                    "name": model.name,
                    "versions": len(versions),
                    "latest_version": max((int(v.version) for v in versions), default=None),
                    "aliases": dict(model.aliases),
                }
            )
    return rows


def show_model(name: str, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Every version of ``name``: version, aliases, tags, source run."""
    client = _client(tracking_uri)
    with _server(client.tracking_uri):
        model = _model(client, name)
        versions = client.search_model_versions(f"name = '{name}'")
    aliases_of: dict[str, list[str]] = {}
    for alias, version in model.aliases.items():
        aliases_of.setdefault(str(version), []).append(alias)
    return [
        {
            "version": int(v.version),
            "aliases": sorted(aliases_of.get(str(v.version), [])),
            "run_id": v.run_id,
            "tags": dict(v.tags),
        }
        for v in sorted(versions, key=lambda v: int(v.version))
    ]


def pull(source: str, directory: Path, tracking_uri: str | None = None) -> Path:
    """Download ``source``'s checkpoint (weights + spec) into ``directory``; return the checkpoint folder."""
    checkpoint = resolve_checkpoint(source, tracking_uri)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for item in checkpoint.iterdir():
        shutil.copy2(item, directory / item.name)
    return directory


def resolve_checkpoint(source: str | Path, tracking_uri: str | None = None) -> Path:
    """A local checkpoint folder for ``source``, its weights checked against their registered SHA-256:
    ``pretrained:NAME`` (shipped in the package), a folder, ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``
    or ``runs:/RUN_ID/...``."""
    text = str(source)
    if text.startswith(PRETRAINED_PREFIX):
        name = text.removeprefix(PRETRAINED_PREFIX)
        shipped = sorted(path.name for path in PRETRAINED.iterdir() if (path / "spec.json").is_file())
        if name not in shipped:
            raise CheckpointError(f"{text}: no such pretrained optimizer; shipped: {', '.join(shipped)}")
        return _verified(PRETRAINED / name, None, text, "reinstall metaopt")
    if not text.startswith(("models:/", "runs:/")):
        path = Path(text).expanduser()
        if not path.is_dir():
            raise CheckpointError(f"{path} is not a checkpoint folder, and not a models:/ or runs:/ URI")
        return _verified(path, None, f"checkpoint {path}", "pull it again")
    client = _client(tracking_uri)
    return _within_deadline(lambda: _resolve_remote(client, text), client.tracking_uri)


def _resolve_remote(client, source: str) -> Path:
    """``resolve_checkpoint`` of a ``models:/`` or ``runs:/`` URI through ``client``."""
    with _server(client.tracking_uri):
        reference = source.partition(":/")[2]
        if source.startswith("runs:/") or reference.startswith("m-"):  # a run's artifact, a logged model
            return _cached(client, source, None)
        name, _, version = reference.partition("/")
        name, _, alias = name.partition("@")
        if not (alias or version):
            raise RegistryError(
                f"{source} names no version or alias: load models:/{name}@ALIAS or models:/{name}/VERSION"
            )
        if version and _entry(client, source).is_dir():  # a version never changes: no server needed
            return _cached(client, source, None)
        registered = _registered_version(client, name, alias, version)
        return _cached(client, f"models:/{name}/{registered.version}", registered.tags.get(DIGEST_TAG))


def _entry(client, source: str) -> Path:
    """The cache folder of ``source`` (a version, run artifact or logged model) from ``client``'s server."""
    uri = client.tracking_uri
    if uri.startswith("sqlite:///"):  # a local store: by its absolute path
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    server = re.sub(r"(?<=://)[^/@]*@", "", uri)  # no credentials in folder names
    return cache_root() / _folder_name(server) / _folder_name(source)


def _folder_name(text: str) -> str:
    """A short, readable folder name that only ``text`` maps to."""
    readable = re.sub(r"[^\w.]+", "-", text).strip("-")[:60]
    return f"{readable}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _cached(client, source: str, expected: str | None) -> Path:
    """The cached checkpoint of ``source``, downloaded unless cached, its weights verified either way."""
    import mlflow
    from mlflow.exceptions import MlflowException

    entry = _entry(client, source)
    if entry.is_dir():
        return _verified(entry, expected, f"the cached copy of {source}", f"delete {entry} to download it again")
    entry.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=entry.parent) as folder:
        try:
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=_artifact_uri(client, source), dst_path=folder, tracking_uri=client.tracking_uri
                )
            )
        except (MlflowException, OSError) as error:
            if _access_error(error, client.tracking_uri):
                raise
            raise RegistryError(
                f"cannot download {source} from {client.tracking_uri}: {str(error).splitlines()[0][:300]}"
            ) from None
        found = [p.parent for p in local.rglob(SPEC)] if local.is_dir() else []
        if not found or not (found[0] / WEIGHTS).is_file():
            raise RegistryError(f"{source} is not a metaopt optimizer: it holds no checkpoint ({SPEC} and {WEIGHTS})")
        staged = Path(folder) / ".entry"
        staged.mkdir()
        for name in (WEIGHTS, SPEC):
            shutil.copy2(found[0] / name, staged / name)
        _verified(
            staged,
            expected,
            f"{source} at {client.tracking_uri}",
            "the artifact store holds other weights than were registered; restore them or register again",
        )
        try:
            os.replace(staged, entry)  # atomic: a half-finished download never looks complete
        except OSError:
            if not entry.is_dir():  # else another process cached it first
                raise
    return entry


def _artifact_uri(client, source: str) -> str:
    """Where ``source``'s files lie, asked of ``client``'s server: MLflow's download resolves a ``models:/`` URI
    on its global registry URI, whatever registry it is given."""
    if source.startswith("runs:/"):
        return source
    reference, _, path = source.removeprefix("models:/").partition("/")
    if reference.startswith("m-"):  # a logged model
        return "/".join(filter(None, [client.get_logged_model(reference).artifact_location, path]))
    return client.get_model_version_download_uri(reference, path)


def _verified(checkpoint: Path, expected: str | None, what: str, remedy: str) -> Path:
    """``checkpoint``, once its weights match ``expected``, else the digest its spec records (if any)."""
    verify_file(checkpoint, WEIGHTS, expected or read_spec(checkpoint).get(DIGEST_KEY), what, remedy, "registered")
    return checkpoint


def _registered_version(client, name: str, alias: str | None = None, version: str | None = None):
    """Model version ``name@alias`` or ``name/version``, with clear errors for an unknown name, alias or version."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as error:
        if error.error_code not in ABSENT:
            raise
    model = _model(client, name)
    if alias and alias.lower() == LATEST:
        raise RegistryError(f"registered model {name!r} has no versions yet")
    if alias:
        known = ", ".join(f"@{a} (version {v})" for a, v in model.aliases.items()) or "none"
        raise RegistryError(
            f"registered model {name!r} has no alias {alias!r}; its aliases: {known}. "
            f"Set one with `metaopt registry promote {name} VERSION {alias}`"
        )
    versions = [str(v.version) for v in client.search_model_versions(f"name = '{name}'")]
    raise RegistryError(
        f"registered model {name!r} has no version {version}; versions: "
        f"{', '.join(sorted(versions, key=int)) or 'none'}"
    )


def _model(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code not in ABSENT:
            raise
        names = [m.name for m in client.search_registered_models()]
        raise RegistryError(
            f"no registered model {name!r} at {client.tracking_uri}; registered: {', '.join(names) or 'none'}"
        ) from None
