"""Run optimizers side by side on held-out optimizees, with optional learning-rate sweeps."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor
from tqdm.auto import tqdm

from metaopt.meta.unroll import mean_final_loss, rollout_losses
from metaopt.optimizers import MetaParams, Optimizer
from metaopt.tasks import TaskFamily, optimizee_seeds

Protocol = Literal["shared", "published"]
PUBLISHED_STREAM = 2**33  # protocol published: candidate i's held-out optimizees come from stream 2**33 + i


@dataclass
class Candidate:
    """An optimizer to compare: ``build(lr)`` makes it; ``lr_sweep`` picks the best lr first."""

    name: str
    build: Callable[[float | None], Optimizer]
    lr: float | None = None
    lr_sweep: Sequence[float] | None = None
    meta_params: MetaParams = field(default_factory=dict)


@dataclass
class Result:
    """One candidate's losses ``[runs, steps + 1]`` on the held-out optimizees (step 0 = initial)."""

    name: str
    optimizer: Optimizer
    losses: Tensor
    sweep_scores: dict[float, float] = field(default_factory=dict)

    @property
    def final_losses(self) -> Tensor:
        return self.losses[:, -1]


def compare(
    candidates: Sequence[Candidate],
    heldout_family: TaskFamily,
    steps: int,
    runs: int,
    seed: int,
    tuning_family: TaskFamily | None = None,
    sweep_runs: int = 20,
    show_progress: bool = True,
    protocol: Protocol = "shared",
) -> list[Result]:
    """Run every candidate on ``runs`` held-out optimizees for ``steps`` steps.

    ``protocol``: ``shared`` runs every candidate on the same optimizees and scores the loss after the
    last step; ``published`` is OPT-ML's: every candidate gets optimizees of its own, and the score is
    the loss before the last update (runs of ``steps - 1`` updates). Candidates with an ``lr_sweep``
    first try each rate on ``sweep_runs`` meta-train optimizees of ``tuning_family`` and keep the one
    with the lowest mean final loss.
    """
    published = protocol == "published"
    if published:
        steps -= 1
    else:
        heldout = heldout_family.sample(optimizee_seeds(seed, runs, "meta_test"))
    tuning = None
    total = sum(steps * (1 + len(c.lr_sweep or ())) for c in candidates)
    results = []
    with tqdm(total=total, desc="evaluate", unit="step", disable=not show_progress) as progress:
        for index, candidate in enumerate(candidates):
            if published:  # optimizees of its own, in place of the shared ones
                heldout = heldout_family.sample(optimizee_seeds(seed, runs, "meta_test", PUBLISHED_STREAM + index))
            lr, scores = candidate.lr, {}
            if candidate.lr_sweep:
                if tuning_family is None:
                    raise ValueError(f"{candidate.name}: an lr_sweep needs a tuning_family to score rates on")
                if tuning is None:
                    tuning = tuning_family.sample(optimizee_seeds(seed, sweep_runs, "meta_train"))
                for rate in candidate.lr_sweep:
                    progress.set_postfix_str(f"{candidate.name} lr={rate:g}")
                    losses = rollout_losses(
                        tuning_family, candidate.build(rate), candidate.meta_params, tuning, steps, progress
                    )
                    scores[rate] = mean_final_loss(losses)
                lr = min(scores, key=scores.get)
            progress.set_postfix_str(candidate.name)
            optimizer = candidate.build(lr)
            losses = rollout_losses(heldout_family, optimizer, candidate.meta_params, heldout, steps, progress)
            results.append(Result(candidate.name, optimizer, losses, scores))
    return results
