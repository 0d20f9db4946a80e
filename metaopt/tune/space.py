"""A search, declared in YAML next to the training config it searches around.

```yaml
base: train_quadratic_phnn.yaml      # the training config, relative to this file
set: {distributed: null, train.meta_steps: 200}   # applied to the base for every trial
search: {samples: 16, scheduler: asha, searcher: random, max_concurrent_trials: 2}
space:                               # dotted config keys -> one domain each
  optimizer.options.hidden: {choice: [8, 16, 32]}
  train.meta_lr: {loguniform: [0.0003, 0.01]}
pbt: {perturbation_interval: 2, mutations: {train.meta_lr: {loguniform: [0.0003, 0.01]}}}
```

Everything is checked before a trial starts: every value a domain can take is applied to the base
config and validated, so an unknown key, an option the optimizer does not have, or a value that
contradicts the rest of the config fails with the key and the reason.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from metaopt.config import (
    Config,
    ConfigError,
    StrictModel,
    read_yaml_mapping,
    set_path,
    validate_config,
    validate_model,
)

DOMAINS = ("choice", "uniform", "loguniform", "randint", "lograndint")
PBT_MUTABLE = ("train.meta_lr", "train.unroll", "train.grad_clip")  # change mid-run; shapes cannot
METRIC = "heldout_loss"  # mean final loss on the validation optimizees; lower is better


class SearchConfig(StrictModel):
    """How trials are sampled, scheduled and resourced."""

    samples: int = Field(8, ge=1, description="trials to run")
    searcher: Literal["random", "optuna"] = "random"
    scheduler: Literal["asha", "pbt", "fifo"] = "asha"
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: as many as resources allow")
    grace_period: int = Field(2, ge=1, description="asha: validations every trial gets before it may be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="asha: keep the best 1/reduction_factor at each rung")
    trial_cpus: float = Field(1.0, gt=0, description="CPUs of a trial's learner (rollout workers add their own)")
    trial_gpus: float = Field(0.0, ge=0, description="GPUs of a trial's learner when it trains in-process")
    seed: int = Field(0, ge=0, description="searcher seed")
    compare_default: bool = Field(
        True,
        description="also meta-train the base config's architecture on the trial "
        "budget and put it in the final comparison",
    )
    register_as: str | None = Field(None, description="register the best trial's optimizer under this name")
    alias: str = "candidate"
    output_dir: str = "runs/tune"


class PBTConfig(StrictModel):
    """Population-based training of meta-hyperparameters that can change mid-run."""

    perturbation_interval: int = Field(2, ge=1, description="validations between exploit/explore steps")
    mutations: dict[str, Any] = Field(min_length=1)


class TuneSpec(StrictModel):
    """A whole search: the base training config, what every trial changes, and the space."""

    base: str
    set: dict[str, Any] = Field(default_factory=dict)
    search: SearchConfig = Field(default_factory=SearchConfig)
    space: dict[str, Any] = Field(default_factory=dict)
    pbt: PBTConfig | None = None

    @model_validator(mode="after")
    def _scheduler_matches(self) -> TuneSpec:
        if self.search.scheduler == "pbt" and self.pbt is None:
            raise ValueError("search.scheduler: pbt needs a pbt section with mutations (e.g. train.meta_lr)")
        if self.pbt is not None and self.search.scheduler != "pbt":
            raise ValueError(f"a pbt section needs search.scheduler: pbt (got {self.search.scheduler})")
        if self.search.scheduler == "pbt" and self.search.searcher != "random":
            raise ValueError("pbt explores by itself: use search.searcher: random with search.scheduler: pbt")
        return self


class SearchSpace:
    """A validated search: the trial base config (as data), the Tune domains, the PBT mutations."""

    def __init__(self, spec: TuneSpec, base: dict, source: str):
        self.spec, self.source = spec, source
        self.base = copy.deepcopy(base)
        for key, value in spec.set.items():
            set_path(self.base, key, value)
        self.config = self._validate(self.base, "set")
        self.config.require("optimizer", "train", "evaluate")
        # Every validation is a checkpoint, so each Tune report carries one.
        self.base["train"]["checkpoint_every"] = self.config.train.eval_every
        if self.config.task.kind == "mnist_mlp":  # trials run in their own folders
            set_path(self.base, "task.data.root", str(Path(self.config.task.data.root).resolve()))
        self.config = self._validate(self.base, "set")
        if not spec.space and spec.pbt is None:
            raise ConfigError(
                f"{source}: the search space is empty; add parameters under space:, e.g. "
                "optimizer.options.hidden: {choice: [8, 16, 32]}"
            )
        self.domains = {key: self._domain(f"space.{key}", key, value) for key, value in spec.space.items()}
        self.mutations: dict[str, Any] = {}
        if spec.pbt is not None:
            for key, value in spec.pbt.mutations.items():
                if key not in PBT_MUTABLE:
                    raise ConfigError(
                        f"{source}: pbt.mutations.{key}: PBT can only change what may change "
                        f"mid-run ({', '.join(PBT_MUTABLE)}); search shapes under space: instead"
                    )
                self.mutations[key] = self._domain(f"pbt.mutations.{key}", key, value)
        self._validate_corners()

    @property
    def param_space(self) -> dict[str, Any]:
        """Tune's param space: the domains, plus the PBT mutations' starting values."""
        return {**{k: v for k, v in self.mutations.items() if k not in self.domains}, **self.domains}

    def trial_config(self, sample: dict[str, Any]) -> Config:
        """The resolved config of a trial with sampled values ``sample`` (dotted keys)."""
        return validate_config(self._applied(sample), source=f"trial of {self.source}")

    def _applied(self, sample: dict[str, Any]) -> dict:
        data = copy.deepcopy(self.base)
        for key, value in sample.items():
            set_path(data, key, value.item() if hasattr(value, "item") else value)
        return data

    def _validate(self, data: dict, where: str, verdict: str = "makes the config invalid") -> Config:
        return validate_config(data, heading=f"{self.source}: {where} {verdict}")

    def _domain(self, where: str, key: str, value: Any):
        """A Tune domain from ``{choice: [...]}`` / ``{uniform|loguniform|randint|lograndint: [lo, hi]}``,
        with each value it can take checked against the config."""
        from ray import tune

        if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in DOMAINS:
            raise ConfigError(
                f"{self.source}: {where}: expected one of {', '.join(f'{{{d}: ...}}' for d in DOMAINS)}, got {value!r}"
            )
        ((kind, args),) = value.items()
        if kind == "choice":
            if not isinstance(args, list) or not args:
                raise ConfigError(f"{self.source}: {where}: choice needs a non-empty list of values")
            values = args
        else:
            if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) for a in args)):
                raise ConfigError(f"{self.source}: {where}: {kind} needs [low, high], got {args!r}")
            low, high = args
            if not low < high:
                raise ConfigError(f"{self.source}: {where}: {kind} needs low < high, got [{low}, {high}]")
            if kind in ("loguniform", "lograndint") and low <= 0:
                raise ConfigError(f"{self.source}: {where}: {kind} needs low > 0, got {low}")
            if kind in ("randint", "lograndint") and not all(isinstance(a, int) for a in args):
                raise ConfigError(f"{self.source}: {where}: {kind} needs integer bounds, got {args!r}")
            values = [low, high - 1 if kind.endswith("randint") else high]
        for candidate in values:
            self._validate(self._applied({key: candidate}), f"{where} = {candidate!r}", "is not a valid value")
        if kind == "choice":
            return tune.choice(values)
        return getattr(tune, kind)(*args)

    def _validate_corners(self) -> None:
        """All lowest and all highest values together: catches values valid alone but not together."""
        keys = {**self.mutations, **self.domains}
        for corner in (0, -1):
            sample = {key: _corner(domain, corner) for key, domain in keys.items()}
            self._validate(
                self._applied(sample),
                f"space with every parameter at its {('lowest', 'highest')[corner]} value ({sample})",
            )


def _corner(domain, corner: int) -> Any:
    from ray.tune.search.sample import Categorical, Integer

    if isinstance(domain, Categorical):
        return domain.categories[corner]
    value = (domain.lower, domain.upper)[corner]
    return value - 1 if isinstance(domain, Integer) and corner == -1 else value


def load_search(path: str | Path, overrides: list[str] | None = None) -> SearchSpace:
    """Read a search YAML (``--set`` overrides apply to it, e.g. ``search.samples=4``) and validate it."""
    path = Path(path)
    data = _apply_search_overrides(
        read_yaml_mapping(path, "search file", "base, set, search, space, pbt"), overrides or []
    )
    spec = validate_model(TuneSpec, data, f"invalid search {path}")
    base_path = (path.parent / spec.base).resolve()
    if not base_path.is_file():
        raise ConfigError(f"{path}: base {spec.base} does not exist (looked for {base_path})")
    base = yaml.safe_load(base_path.read_text()) or {}
    validate_config(copy.deepcopy(base), source=str(base_path))
    return SearchSpace(spec, base, str(path))


def _apply_search_overrides(data: dict, overrides: list[str]) -> dict:
    """``--set`` for a search file: dotted keys inside ``set:``/``space:`` stay whole (``set.train.meta_lr``)."""
    from metaopt.config import apply_overrides

    plain = []
    for override in overrides:
        section, _, rest = override.partition(".")
        if section in ("set", "space") and "=" in rest:
            key, _, raw = rest.partition("=")
            data.setdefault(section, {})[key] = yaml.safe_load(raw)
        else:
            plain.append(override)
    return apply_overrides(data, plain)
