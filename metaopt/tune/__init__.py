"""Ray Tune architecture search for learned optimizers: a YAML search space, one meta-training run
per trial, ASHA/Optuna/PBT, every trial an MLflow run nested under the search's, the best registered."""

import metaopt.distributed  # noqa: F401 - sets Ray's worker environment before ray is imported
from metaopt.tune.space import METRIC, SearchSpace, TuneSpec, load_search  # noqa: E402

__all__ = ["METRIC", "SearchSpace", "TuneSpec", "load_search"]
