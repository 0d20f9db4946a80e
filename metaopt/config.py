"""Typed, validated experiment configs loaded from YAML.

Every error names the field (``evaluate.optimizers[1].lr``), what was wrong and what is allowed,
and is raised before any work starts.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from metaopt.optimizers import LEARNED, OPTIMIZERS, optimizer_options
from metaopt.tasks.module import load_factory

Model = typing.TypeVar("Model", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or override is invalid; the message says which field and what is allowed."""


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class QuadraticTaskConfig(StrictModel):
    """f(θ) = ‖Wθ − y‖², W and y standard normal, redrawn for every optimizee."""

    kind: Literal["quadratic"] = "quadratic"
    dim: int = Field(10, ge=1, le=100_000)


class DataConfig(StrictModel):
    """Where MNIST lives and which of its splits to use."""

    root: str = "data"
    split: Literal["train", "test"] = "train"
    download: bool = True


class MnistMLPTaskConfig(StrictModel):
    """An MLP 784 → hidden_sizes… → 10 on MNIST, cross-entropy, a new minibatch every step."""

    kind: Literal["mnist_mlp"] = "mnist_mlp"
    activation: Literal["sigmoid", "relu", "tanh"] = "sigmoid"
    hidden_sizes: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [20], min_length=1)
    batch_size: int = Field(128, ge=1)
    init: Literal["normal", "pytorch"] = Field(
        "normal",
        description="normal: weights ~ N(0, 0.001²), biases 0; pytorch: torch.nn.Linear's default, "
        "weights and biases ~ U(±1/√fan_in) (OPT-ML's optimizee)",
    )
    data: DataConfig = Field(default_factory=DataConfig)


class ModuleTaskConfig(StrictModel):
    """Optimizees from any torch.nn.Module: ``factory`` (``package.module:function``) returns a
    ``metaopt.tasks.ModuleTaskSpec`` (the model, its data and its loss); a minibatch of ``batch_size``
    examples every step."""

    kind: Literal["module"] = "module"
    factory: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    batch_size: int = Field(32, ge=1)

    @field_validator("factory")
    @classmethod
    def _importable(cls, factory: str) -> str:
        load_factory(factory)  # a missing module or function is an error of the config, found when it loads
        return factory


Choices = Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)]
SizeChoices = Annotated[list[list[Annotated[int, Field(ge=1)]]], Field(min_length=1)]
ActivationChoices = Annotated[list[Literal["relu", "tanh", "sigmoid", "gelu"]], Field(min_length=1)]


class SampledTaskConfig(StrictModel):
    """A task family whose configuration is drawn from a task seed: every field holding a list of choices
    (``CHOICES``) takes one of them, uniformly; ``parameter_scale`` > 1 rescales each optimizee's parameter
    tensors by factors log-uniform in [1/parameter_scale, parameter_scale] (VeLO's augmentation)."""

    CHOICES: ClassVar[tuple[str, ...]] = ("batch_size",)
    batch_size: Choices = Field(default_factory=lambda: [32])
    parameter_scale: float = Field(1.0, ge=1.0)

    def choose(self, seed: int) -> dict[str, Any]:
        """The configuration of the task ``seed`` draws: one value of every list of choices."""
        rng = np.random.default_rng([seed, 1])
        return {name: getattr(self, name)[rng.integers(len(getattr(self, name)))] for name in self.CHOICES}


class ImageMLPTaskConfig(SampledTaskConfig):
    """MLPs on MNIST, downsampled to ``image_size`` × ``image_size`` pixels, cross-entropy."""

    CHOICES: ClassVar[tuple[str, ...]] = ("batch_size", "image_size", "hidden_sizes", "activation")
    kind: Literal["image_mlp"] = "image_mlp"
    image_size: Annotated[list[Annotated[int, Field(ge=1, le=28)]], Field(min_length=1)] = Field(
        default_factory=lambda: [8, 28]
    )
    hidden_sizes: SizeChoices = Field(default_factory=lambda: [[32]])
    activation: ActivationChoices = Field(default_factory=lambda: ["relu"])
    data: DataConfig = Field(default_factory=DataConfig)


class ImageCNNTaskConfig(SampledTaskConfig):
    """Small CNNs (3×3 convolutions with ``channels``, a linear read-out) on downsampled MNIST."""

    CHOICES: ClassVar[tuple[str, ...]] = ("batch_size", "image_size", "channels", "activation")
    kind: Literal["image_cnn"] = "image_cnn"
    image_size: Annotated[list[Annotated[int, Field(ge=4, le=28)]], Field(min_length=1)] = Field(
        default_factory=lambda: [8]
    )
    channels: SizeChoices = Field(default_factory=lambda: [[8, 16]])
    activation: ActivationChoices = Field(default_factory=lambda: ["relu"])
    data: DataConfig = Field(default_factory=DataConfig)


class MarkovTransformerTaskConfig(SampledTaskConfig):
    """A small causal transformer predicting the next token of sequences from a random Markov chain
    (the chain drawn from the task seed)."""

    CHOICES: ClassVar[tuple[str, ...]] = ("batch_size", "vocab", "length", "d_model", "heads", "layers")
    kind: Literal["markov_transformer"] = "markov_transformer"
    vocab: Choices = Field(default_factory=lambda: [8])
    length: Choices = Field(default_factory=lambda: [16])
    d_model: Choices = Field(default_factory=lambda: [16])
    heads: Choices = Field(default_factory=lambda: [2])
    layers: Choices = Field(default_factory=lambda: [1])

    @model_validator(mode="after")
    def _heads_divide_width(self) -> MarkovTransformerTaskConfig:
        bad = [(d, h) for d in self.d_model for h in self.heads if d % h]
        if bad:
            raise ValueError(f"every d_model must be a multiple of every heads choice; not so for {bad}")
        return self


class CharLMTaskConfig(SampledTaskConfig):
    """A character-level language model (an MLP over the ``context`` previous characters) on English-like
    text generated from the task seed."""

    CHOICES: ClassVar[tuple[str, ...]] = ("batch_size", "context", "embed", "hidden")
    kind: Literal["char_lm"] = "char_lm"
    context: Choices = Field(default_factory=lambda: [8])
    embed: Choices = Field(default_factory=lambda: [8])
    hidden: Choices = Field(default_factory=lambda: [64])


class TeacherStudentTaskConfig(SampledTaskConfig):
    """Regression (mean squared error) of a student MLP onto a random teacher MLP's outputs plus noise."""

    CHOICES: ClassVar[tuple[str, ...]] = ("batch_size", "input_dim", "teacher_hidden", "hidden_sizes", "activation")
    kind: Literal["teacher_student"] = "teacher_student"
    input_dim: Choices = Field(default_factory=lambda: [16])
    teacher_hidden: Choices = Field(default_factory=lambda: [32])
    hidden_sizes: SizeChoices = Field(default_factory=lambda: [[32]])
    activation: ActivationChoices = Field(default_factory=lambda: ["relu"])
    noise: float = Field(0.1, ge=0)


SAMPLED_TASKS = (
    ImageMLPTaskConfig,
    ImageCNNTaskConfig,
    MarkovTransformerTaskConfig,
    CharLMTaskConfig,
    TeacherStudentTaskConfig,
)
TaskConfig = Annotated[
    QuadraticTaskConfig
    | MnistMLPTaskConfig
    | ModuleTaskConfig
    | ImageMLPTaskConfig
    | ImageCNNTaskConfig
    | MarkovTransformerTaskConfig
    | CharLMTaskConfig
    | TeacherStudentTaskConfig,
    Field(discriminator="kind"),
]


class MixtureEntry(StrictModel):
    """One family of a meta-training mixture and its weight (the chance of an episode drawing it)."""

    task: TaskConfig
    weight: float = Field(1.0, gt=0)


def _check_options(kind: str, options: dict[str, Any]) -> None:
    allowed = optimizer_options(kind)
    unknown = sorted(set(options) - set(allowed) | ({"lr"} & set(options)))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for optimizer {kind!r}; allowed options: "
            f"{', '.join(k for k in allowed if k != 'lr') or 'none'}"
            + (" (set lr with the 'lr' field)" if "lr" in allowed else "")
        )


class OptimizerConfig(StrictModel):
    """One optimizer to evaluate: a kind with its learning rate (or a sweep of rates) and options,
    or a trained optimizer's ``checkpoint`` folder (``options`` then replace its hyperparameters, e.g.
    ``out_mul``)."""

    kind: str | None = None
    checkpoint: str | None = None
    name: str | None = None
    lr: float | None = Field(None, gt=0)
    lr_sweep: list[Annotated[float, Field(gt=0)]] | None = Field(None, min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str | None) -> str | None:
        if kind is not None and kind not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {kind!r}; allowed: {', '.join(sorted(OPTIMIZERS))}")
        return kind

    @model_validator(mode="after")
    def _consistent(self) -> OptimizerConfig:
        if (self.kind is None) == (self.checkpoint is None):
            raise ValueError("give exactly one of kind (a built-in optimizer) or checkpoint (a trained one's folder)")
        if self.checkpoint is not None:
            if self.lr is not None or self.lr_sweep is not None:
                raise ValueError(
                    "a checkpoint carries its own settings: drop lr and lr_sweep (options replace its own)"
                )
            if self.name is None:
                self.name = Path(self.checkpoint).name
            return self
        _check_options(self.kind, self.options)
        if self.lr is not None and self.lr_sweep is not None:
            raise ValueError("set either lr or lr_sweep, not both")
        if self.name is None:
            self.name = self.kind
        return self

    def build(self, lr: float | None = None):
        """The optimizer with ``lr`` (default: the configured one)."""
        from metaopt.optimizers import make_optimizer

        lr = lr if lr is not None else self.lr
        return make_optimizer(self.kind, **({"lr": lr} if lr is not None else {}), **self.options)


class LearnedOptimizerConfig(StrictModel):
    """The learned optimizer to meta-train: its kind and constructor options."""

    kind: str = "phnn"
    options: dict[str, Any] = Field(default_factory=dict)
    evaluate_options: dict[str, Any] = Field(
        default_factory=dict,
        description="options that replace these when the trained optimizer is evaluated after meta-training "
        "(OPT-ML's MNIST LSTM: trained at out_mul 0.1, evaluated at 1.0)",
    )

    @field_validator("kind")
    @classmethod
    def _learned_kind(cls, kind: str) -> str:
        if kind not in LEARNED:
            raise ValueError(f"{kind!r} is not a learned optimizer; allowed: {', '.join(LEARNED)}")
        return kind

    @model_validator(mode="after")
    def _known_options(self) -> LearnedOptimizerConfig:
        _check_options(self.kind, self.options)
        _check_options(self.kind, self.evaluate_options)
        return self

    def build(self):
        """The configured learned optimizer."""
        from metaopt.optimizers import make_optimizer

        return make_optimizer(self.kind, **self.options)


class EstimatorConfig(StrictModel):
    """How meta-gradients are estimated: truncated backprop (tbptt), antithetic ES, or PES."""

    kind: Literal["tbptt", "es", "pes"] = "tbptt"
    second_order: bool = False
    pairs: int = Field(8, ge=1, description="antithetic perturbation pairs (es, pes)")
    sigma: float = Field(0.01, gt=0, description="perturbation scale (es, pes)")

    @model_validator(mode="after")
    def _second_order_needs_backprop(self) -> EstimatorConfig:
        if self.second_order and self.kind != "tbptt":
            raise ValueError("second_order applies to kind: tbptt only")
        return self


class TrainConfig(StrictModel):
    """Meta-training: episodes of ``episode_length`` optimizee steps, a meta-step every ``unroll``."""

    meta_steps: int = Field(500, ge=1)
    unroll: int = Field(20, ge=1)
    episode_length: Annotated[int, Field(ge=1)] | Choices = Field(
        100,
        description="optimizee steps per episode; a list is a truncation schedule: every episode draws one of "
        "the lengths, and a learned step schedule (optimizer.options.horizon) is stretched over it",
    )
    batch_size: int = Field(128, ge=1, description="optimizees trained together in each episode")
    meta_lr: float = Field(0.003, gt=0)
    grad_clip: float | None = Field(1.0, gt=0)
    estimator: EstimatorConfig = Field(default_factory=EstimatorConfig)
    unroll_checkpoint_steps: int = Field(
        0,
        ge=0,
        description="tbptt: activation checkpointing of the unroll; recompute it during the "
        "meta-backward in chunks of this many steps (same meta-gradient, memory ~flat in unroll; 0: off)",
    )
    tasks: list[MixtureEntry] | None = Field(
        None,
        min_length=1,
        description="meta-train on a mixture: every episode (on every Ray worker) draws one family by weight and "
        "a configuration of it; default: the config's task (which is always the one validated on)",
    )
    meta_loss: Literal["loss", "relative", "pre_update"] = Field(
        "loss",
        description="loss: the losses after each step of a truncation; relative: each optimizee's losses over "
        "its loss at the start of its episode, so that families whose losses differ in scale weigh alike in a "
        "mixture; pre_update: the losses before each update (OPT-ML's; a truncation's last update counts in no "
        "meta-gradient)",
    )
    partial_truncations: bool = Field(
        True,
        description="false: an episode ends at its last full truncation of unroll steps (OPT-ML's 100 steps in "
        "truncations of 15 meta-train on the first 90)",
    )
    validation: Literal["task", "mixture"] = Field(
        "task",
        description="what checkpoints are chosen on: the config's task, or (with tasks) eval_tasks tasks drawn "
        "from the mixture, scored by each optimizee's final loss relative to its initial one",
    )
    eval_tasks: int = Field(8, ge=1, description="validation: mixture: how many tasks are drawn")
    validation_metric: Literal["final", "mean"] = Field(
        "final", description="what a validation scores: the final loss, or (OPT-ML's) the mean loss before each update"
    )
    validation_draw: Literal["fixed", "fresh"] = Field(
        "fixed",
        description="fixed: the same validation optimizees every time; fresh: new ones every validation (OPT-ML's)",
    )
    seed: int = Field(0, ge=0)
    eval_every: int = Field(50, ge=1)
    eval_runs: int = Field(20, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    output_dir: str = "runs/train"

    @model_validator(mode="after")
    def _mixture_to_validate_on(self) -> TrainConfig:
        if self.validation == "mixture" and self.tasks is None:
            raise ValueError("validation: mixture needs a mixture: set tasks, or validation: task")
        return self

    @property
    def episode_lengths(self) -> list[int]:
        """The episode lengths episodes draw from (one without a truncation schedule)."""
        return [self.episode_length] if isinstance(self.episode_length, int) else self.episode_length

    @model_validator(mode="after")
    def _unroll_fits(self) -> TrainConfig:
        if self.unroll > min(self.episode_lengths):
            raise ValueError(f"unroll ({self.unroll}) must not exceed episode_length ({min(self.episode_lengths)})")
        return self


class DistributedConfig(StrictModel):
    """Meta-training on a Ray cluster: ``workers`` RolloutWorker actors share each meta-step's optimizees."""

    workers: int = Field(2, ge=1, description="RolloutWorker actors; train.batch_size is split evenly among them")
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per worker (also its torch threads)")
    num_gpus: float | Literal["auto"] = Field(
        "auto",
        description="GPUs per worker; a fraction such as 0.25 lets workers share a GPU; "
        "auto: an equal share of the cluster's GPUs (at most 1), 0 without GPUs",
    )
    mode: Literal["sync", "async"] = "sync"
    max_staleness: int = Field(2, ge=0, description="async: gradients more meta-steps old than this are dropped")
    max_restarts: int = Field(3, ge=-1, description="restarts of a dead worker (-1: unlimited)")
    restart_timeout: float = Field(
        600.0,
        gt=0,
        description="seconds a failed worker may take to answer again before it is dropped, "
        "e.g. when its node is gone and no other node has room for it",
    )
    resources: dict[str, Annotated[float, Field(ge=0.0001)]] = Field(
        default_factory=dict,
        description="custom Ray resources per worker, e.g. {rollout: 1}: workers run only "
        "on nodes started with them (ray start --resources='{\"rollout\": 4}')",
    )
    address: str | None = Field(
        None,
        description="Ray cluster address; default RAY_ADDRESS, a running "
        "`ray start` cluster, or a local Ray started for this run",
    )

    @field_validator("num_gpus")
    @classmethod
    def _non_negative(cls, num_gpus: float | str) -> float | str:
        if num_gpus != "auto" and num_gpus < 0:
            raise ValueError("num_gpus must be >= 0 or auto")
        return num_gpus

    @field_validator("resources")
    @classmethod
    def _custom_only(cls, resources: dict[str, float]) -> dict[str, float]:
        if {"CPU", "GPU"} & set(resources):
            raise ValueError("set CPUs and GPUs with num_cpus and num_gpus, not in resources")
        if "" in resources:
            raise ValueError("a resource name must not be empty")
        return resources


class TrackingConfig(StrictModel):
    """MLflow tracking of ``metaopt train`` (by the driver only) and registration of its optimizer."""

    enabled: bool = True
    uri: str | None = Field(
        None,
        description="tracking URI; default MLFLOW_TRACKING_URI, else MLflow's "
        "local default (sqlite:///mlflow.db, artifacts in ./mlruns)",
    )
    experiment: str = "metaopt"
    register_as: str | None = Field(None, description="register the best optimizer under this model name")
    alias: str = Field(
        "latest", description="alias of the registered version (latest: MLflow's reserved alias for the newest version)"
    )


class EvaluateConfig(StrictModel):
    """Optimizers run side by side on held-out optimizees."""

    steps: int = Field(100, ge=1)
    runs: int = Field(100, ge=1)
    seed: int = Field(0, ge=0)
    sweep_runs: int = Field(20, ge=1, description="meta-train optimizees each swept learning rate is scored on")
    protocol: Literal["shared", "published"] = Field(
        "shared",
        description="shared: every optimizer on the same held-out optimizees, scored after the last step; "
        "published (OPT-ML's): optimizees drawn anew for each optimizer, scored by the loss before the last update",
    )
    optimizers: list[OptimizerConfig] = Field(min_length=1)
    output_dir: str = "runs/evaluate"

    @field_validator("optimizers")
    @classmethod
    def _unique_names(cls, optimizers: list[OptimizerConfig]) -> list[OptimizerConfig]:
        duplicated = repeated([o.name for o in optimizers])
        if duplicated:
            raise ValueError(f"optimizer names must be unique; give each a distinct 'name' ({', '.join(duplicated)})")
        return optimizers


class Config(StrictModel):
    """A whole experiment: the task, and what to evaluate and/or meta-train on it."""

    task: TaskConfig
    evaluate: EvaluateConfig | None = None
    optimizer: LearnedOptimizerConfig | None = None
    train: TrainConfig | None = None
    distributed: DistributedConfig | None = None
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    device: str = "auto"

    @model_validator(mode="after")
    def _batch_splits_evenly(self) -> Config:
        if self.distributed and self.train and self.train.batch_size % self.distributed.workers:
            raise ValueError(
                f"train.batch_size ({self.train.batch_size}) must be a multiple of distributed.workers "
                f"({self.distributed.workers}) so every worker gets an equal share of the optimizees"
            )
        return self

    @model_validator(mode="after")
    def _schedule_spans_an_episode(self) -> Config:
        horizon = self.optimizer.options.get("horizon") if self.optimizer else None
        if horizon is not None and self.train and horizon not in self.train.episode_lengths:
            raise ValueError(
                f"optimizer.options.horizon ({horizon}) must equal train.episode_length "
                f"({self.train.episode_length}; one of a list): the learned step schedule spans one optimizee run"
            )
        return self

    def require(self, *sections: str) -> None:
        """Raise ``ConfigError`` unless every named section is present."""
        missing = [name for name in sections if getattr(self, name) is None]
        if missing:
            raise ConfigError(f"this command needs the config section(s): {', '.join(missing)}")

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if device in ("auto", "cpu", "cuda", "mps") or (device.startswith("cuda:") and device[5:].isdigit()):
            return device
        raise ValueError(f"unknown device {device!r}; allowed: auto, cpu, cuda, cuda:N, mps")


def repeated(names: list[str]) -> list[str]:
    """The names that occur more than once, sorted."""
    return sorted({name for name in names if names.count(name) > 1})


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; a device this machine does not have raises ``ConfigError``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device: {device!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device: {device}, but torch finds no CUDA GPU on this machine (torch.cuda.is_available() is False); "
            "use device: auto (CUDA where present, else CPU) or cpu"
        )
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device: {device}, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return resolved


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML; list items by index) to ``data``."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE such as evaluate.runs=10; got {override!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            problem = str(getattr(error, "problem", None) or error).splitlines()[0]
            raise ConfigError(
                f"--set {override}: {raw!r} is not a YAML value ({problem}); close brackets and quotes, "
                "e.g. --set 'train.episode_lengths=[50, 100]' or --set 'evaluate.optimizers=[{kind: adam}]'"
            ) from None
        set_path(data, key, value)
    return data


def set_path(data: dict, key: str, value: Any) -> None:
    """Set dotted ``key`` (``train.meta_lr``, ``evaluate.optimizers.0.lr``) in ``data`` to ``value``."""
    *parents, leaf = key.split(".")
    node: Any = data
    for part in parents:
        node = _child(node, part, key, create=True)
    if isinstance(node, list):
        node[_index(node, leaf, key)] = value
    else:
        node[leaf] = value


def _index(node: list, part: str, key: str) -> int:
    """A list index; ``len(node)`` appends a new item."""
    if not part.isdigit() or int(part) > len(node):
        raise ConfigError(
            f"--set {key}: {part!r} is not an index of a list of {len(node)} items "
            f"(0-{len(node) - 1}, or {len(node)} to append)"
        )
    if int(part) == len(node):
        node.append({})
    return int(part)


def _child(node: Any, part: str, key: str, create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, key)]
    if not isinstance(node, dict):
        raise ConfigError(f"--set {key}: {part!r} is inside a value that is not a section")
    if part not in node and create:
        node[part] = {}
    return node[part]


def read_yaml_mapping(path: Path, what: str, sections: str) -> dict:
    """The mapping in YAML file ``path`` (a ``what``: "config file", "search file"), or ``ConfigError``."""
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist; they ship in jobs/configs/")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{what} {path} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}); "
            "save it as UTF-8"
        ) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections ({sections}), not {type(data).__name__}")
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read, override and validate a YAML config; any problem raises ``ConfigError``."""
    data = read_yaml_mapping(Path(path), "config file", "task, evaluate, ...")
    return validate_config(apply_overrides(data, overrides or []), source=str(path))


def validate_config(data: dict, source: str = "config", heading: str | None = None) -> Config:
    """Validate a config mapping, turning pydantic's errors into one readable ``ConfigError``
    (headed ``invalid config SOURCE``, or ``heading``)."""
    return validate_model(Config, data, heading or f"invalid config {source}")


def validate_model(root: type[Model], data: dict, heading: str) -> Model:
    """``data`` validated as a ``root`` model (a config, a search, a suite); its errors become one
    ``ConfigError`` under ``heading``, a line per field naming it, what was wrong and what is allowed."""
    try:
        return root.model_validate(data)
    except ValidationError as error:
        lines = [_describe(err, root) for err in error.errors()]
        raise ConfigError(heading + ":\n  " + "\n  ".join(lines)) from None


def _describe(err: dict, root: type[BaseModel]) -> str:
    path, model = _field_path(err["loc"], root)
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(model.model_fields) if model else "see the docs"
        return f"{path}: unknown field; allowed fields here: {allowed}"
    if err["type"] == "missing":
        return f"{path}: required field is missing"
    got = "" if isinstance(err["input"], dict) else f" (got {err['input']!r})"
    return f"{path}: {message}{got}"


def _field_path(loc: tuple, root: type[BaseModel]) -> tuple[str, type[BaseModel] | None]:
    """A dotted path for pydantic's ``loc`` in ``root`` (union tags dropped) and the model that owns its end."""
    path, annotation, owner = "", root, None
    for part in loc:
        annotation = _strip_annotated(annotation)
        if typing.get_origin(annotation) in (Union, types.UnionType):
            members = [m for m in typing.get_args(annotation) if m is not type(None)]
            tagged = [m for m in members if _is_model(m) and _tag(m) == part]
            if tagged:  # a discriminated union's tag: choose that member, add nothing to the path
                annotation = tagged[0]
                continue
            annotation = _strip_annotated(members[0])
        if isinstance(part, int):
            path += f"[{part}]"
            args = typing.get_args(annotation)
            annotation = args[0] if args else Any
            continue
        path += f".{part}" if path else str(part)
        if _is_model(annotation):
            owner = annotation
            field = annotation.model_fields.get(part)
            annotation = field.annotation if field else Any
    return path or "config", owner


def _strip_annotated(annotation: Any) -> Any:
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _tag(model: type[BaseModel]) -> Any:
    field = model.model_fields.get("kind")
    return field.default if field else None
