"""Meta-gradient estimators over truncated unrolls (learned_optimization's GradientEstimator).

Each estimator owns the optimizee state it carries between truncations and returns a
meta-gradient for the current meta-parameters:

- ``TruncatedBackprop``: backpropagation through the unroll, first-order (default) or full.
- ``AntitheticES``: antithetic evolution strategies; needs only losses. Every particle carries
  its own optimizees, and each truncation draws fresh perturbations (truncated ES).
- ``AntitheticES(persistent=True)`` is PES (Vicol et al. 2021): the same particles, but the
  perturbations accumulate over the truncations of an episode, which removes truncated ES's bias.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import torch
from torch import Tensor

from metaopt.meta.unroll import UnrollState, start_episode, unroll
from metaopt.optimizers import MetaParams, Optimizer
from metaopt.tasks import Optimizees, TaskFamily, TaskMixture

SeedsFn = Callable[[int], list[int]]  # episode index -> optimizee seeds
MetaLoss = Literal["loss", "relative", "pre_update"]


@dataclass
class Estimate:
    """A meta-gradient and what the truncation measured."""

    grads: MetaParams
    meta_loss: float  # mean optimizee loss over the truncation's steps
    optimizee_steps: int  # optimizee steps taken (optimizees × steps)
    stats: dict[str, float] = field(default_factory=dict)  # extra metrics (e.g. from Ray workers)


class GradientSource(Protocol):
    """What the meta-trainer needs from an estimator: an ``Estimator`` here, Ray workers elsewhere."""

    def estimate(self, meta_params: MetaParams) -> Estimate: ...

    def reset_episode(self) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, saved: dict) -> None: ...


class Estimator:
    """Carries optimizee state across truncations; ``estimate`` gives the next meta-gradient.

    ``tasks``: a ``TaskFamily``, or a ``TaskMixture`` that draws each episode's family. ``episode_length``:
    the optimizee steps of an episode, or a truncation schedule: lengths each episode draws one of (from
    ``seed`` and the episode), with a learned step schedule stretched over the drawn length. ``meta_loss``:
    ``loss``, the losses after each step of a truncation; ``relative``, each optimizee's losses over its
    loss at the start of its episode, so that families whose losses differ in scale weigh alike in a
    mixture; ``pre_update``, the losses before each update (OPT-ML's: the loss after a truncation's last
    update counts in no meta-gradient). ``partial_truncations=False`` ends an episode at its last full
    truncation (OPT-ML's 100 steps in truncations of 15 meta-train on the first 90).
    """

    def __init__(
        self,
        tasks: TaskFamily | TaskMixture,
        optimizer: Optimizer,
        seeds: SeedsFn,
        unroll_length: int,
        episode_length: int | Sequence[int],
        meta_loss: MetaLoss = "loss",
        seed: int = 0,
        partial_truncations: bool = True,
    ):
        self.tasks = tasks
        self.meta_loss = meta_loss
        self.partial_truncations = partial_truncations
        self.loss_scale: Tensor | None = None  # relative: each optimizee's loss at the start of its episode
        self.base_optimizer = optimizer
        self.seeds = seeds
        self.seed = seed
        self.unroll_length = unroll_length
        self.episode_lengths = [episode_length] if isinstance(episode_length, int) else list(episode_length)
        self.episode = 0
        self.state: UnrollState | None = None
        self._begin(0)

    def _begin(self, episode: int) -> None:
        """Set episode ``episode``'s family, length and optimizer (its step schedule spanning that length)."""
        self.family = self.tasks.episode_family(episode)
        lengths = self.episode_lengths
        self.episode_length = (
            lengths[0] if len(lengths) == 1 else int(np.random.default_rng([self.seed, episode]).choice(lengths))
        )
        self.optimizer = self.base_optimizer.spanning(self.episode_length)

    def _state_for_step(self) -> UnrollState:
        """The carried state, or the next episode's fresh optimizees when the last one is over."""
        last_start = self.episode_length - (1 if self.partial_truncations else self.unroll_length)
        if self.state is not None and self.state.step > last_start:
            self.reset_episode()
        if self.state is None:
            self.state = self._new_episode()
            if self.meta_loss == "relative":
                start = self.state.optimizees
                with torch.no_grad():
                    self.loss_scale = self.family.batched_loss(start.params, start, 0).clamp(min=1e-12)
        return self.state

    def _meta_losses(self, losses: Tensor) -> Tensor:
        """The truncation's losses after each step ``[length, B]`` as the meta-loss counts them: as they
        are, relative, or (pre_update) the ``length - 1`` that precede an update of this truncation."""
        if self.meta_loss == "relative":
            return losses / self.loss_scale
        return losses[:-1] if self.meta_loss == "pre_update" else losses

    def _new_episode(self) -> UnrollState:
        return start_episode(self._sample(), self.optimizer)

    def _sample(self) -> Optimizees:
        """This episode's optimizees (its family, length and optimizer set from now on)."""
        self._begin(self.episode)
        return self.family.sample(self.seeds(self.episode))

    def reset_episode(self) -> None:
        """Move on to a new episode (also after a non-finite meta-gradient)."""
        self.episode += 1
        self.state = None

    def _length(self, state: UnrollState) -> int:
        return min(self.unroll_length, self.episode_length - state.step)

    def estimate(self, meta_params: MetaParams) -> Estimate:
        raise NotImplementedError

    # Checkpointing: the carried state as a flat dict of tensors (torch.load(weights_only=True)).
    def state_dict(self) -> dict:
        if self.state is None:
            return {"episode": self.episode}
        s = self.state
        return {
            **({"loss_scale": self.loss_scale} if self.meta_loss == "relative" else {}),
            "episode": self.episode,
            "step": s.step,
            "seeds": s.optimizees.seeds,
            "params": s.params.detach(),
            "data": dict(s.optimizees.data),
            "opt_state": {k: v.detach() for k, v in s.opt_state.items()},
        }

    def load_state_dict(self, saved: dict) -> None:
        self.episode = int(saved["episode"])
        self._begin(self.episode)
        if "step" not in saved:
            self.state = None
            return
        self.loss_scale = saved.get("loss_scale")
        optimizees = Optimizees(saved["seeds"], saved["params"], dict(saved["data"]))
        self.state = UnrollState(optimizees, saved["params"], dict(saved["opt_state"]), int(saved["step"]))


class TruncatedBackprop(Estimator):
    """Backpropagate the summed optimizee loss of a truncation into the meta-parameters."""

    def __init__(self, *args, second_order: bool = False, checkpoint_steps: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.second_order = second_order
        self.checkpoint_steps = checkpoint_steps  # > 0: recompute the unroll in chunks of this many steps

    def estimate(self, meta_params: MetaParams) -> Estimate:
        state = self._state_for_step()
        leaves = {k: v.detach().requires_grad_(True) for k, v in meta_params.items()}
        length = self._length(state)
        losses, new_state = unroll(
            self.family, self.optimizer.update, leaves, state, length, self.second_order, self.checkpoint_steps
        )
        counted = self._meta_losses(losses)
        meta_loss = counted.mean(dim=1).sum()
        grads = torch.autograd.grad(meta_loss, list(leaves.values()), allow_unused=True)
        self.state = new_state.detached()
        return Estimate(
            {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)},
            float(meta_loss.detach()) / max(len(counted), 1),
            length * len(state.optimizees),
        )


class AntitheticES(Estimator):
    """Antithetic ES over ``pairs`` perturbation pairs of scale ``sigma``; PES when ``persistent``."""

    def __init__(self, *args, pairs: int = 8, sigma: float = 0.01, persistent: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.pairs = pairs
        self.sigma = sigma
        self.persistent = persistent
        self.generator = torch.Generator().manual_seed(self.seed)
        self.accumulated: dict[str, Tensor] | None = None

    def _new_episode(self) -> UnrollState:
        """Every one of the 2·pairs particles gets a copy of the same fresh optimizees."""
        self.accumulated = None
        base = self._sample()
        particles = 2 * self.pairs
        optimizees = Optimizees(
            base.seeds.repeat(particles),
            base.params.repeat(particles, 1),
            {k: v.repeat(particles, *[1] * (v.dim() - 1)) for k, v in base.data.items()},
        )
        return start_episode(optimizees, self.optimizer)

    def estimate(self, meta_params: MetaParams) -> Estimate:
        state = self._state_for_step()
        noise = {
            k: torch.randn((self.pairs, *v.shape), generator=self.generator).to(v) * self.sigma
            for k, v in meta_params.items()
        }
        perturbed = {k: torch.cat([v + noise[k], v - noise[k]]) for k, v in meta_params.items()}
        if self.persistent:
            self.accumulated = noise if self.accumulated is None else {k: self.accumulated[k] + noise[k] for k in noise}
        direction = self.accumulated if self.persistent else noise
        particles = 2 * self.pairs
        per_particle = len(state.optimizees) // particles

        def update(params_: MetaParams, grads: Tensor, opt_state, step: int):
            split = lambda t: t.reshape(particles, per_particle, *t.shape[1:])  # noqa: E731
            updates, new_state = self.optimizer.update_particles(
                params_, split(grads), {k: split(v) for k, v in opt_state.items()}, step
            )
            merge = lambda t: t.reshape(particles * per_particle, *t.shape[2:])  # noqa: E731
            return merge(updates), {k: merge(v) for k, v in new_state.items()}

        length = self._length(state)
        with torch.no_grad():
            losses, new_state = unroll(self.family, update, perturbed, state, length)
        self.state = new_state.detached()
        counted = self._meta_losses(losses)
        particle_loss = counted.reshape(len(counted), particles, per_particle).mean(dim=(0, 2))  # [2·pairs]
        difference = particle_loss[: self.pairs] - particle_loss[self.pairs :]  # [pairs]
        scale = len(counted) / (2 * self.sigma**2 * self.pairs)
        grads = {k: scale * torch.einsum("p,p...->...", difference, direction[k]) for k in meta_params}
        return Estimate(grads, float(particle_loss.mean()), length * len(state.optimizees))

    def state_dict(self) -> dict:
        saved = {**super().state_dict(), "generator": self.generator.get_state()}
        if self.accumulated is not None:
            saved["accumulated"] = self.accumulated
        return saved

    def load_state_dict(self, saved: dict) -> None:
        super().load_state_dict(saved)
        self.generator.set_state(saved["generator"])
        self.accumulated = dict(saved["accumulated"]) if "accumulated" in saved else None


def make_estimator(
    config,
    tasks: TaskFamily | TaskMixture,
    optimizer: Optimizer,
    seeds: SeedsFn,
    unroll_length: int,
    episode_length: int | Sequence[int],
    seed: int = 0,
    checkpoint_steps: int = 0,
    meta_loss: MetaLoss = "loss",
    partial_truncations: bool = True,
) -> Estimator:
    """The estimator an ``EstimatorConfig`` describes; ``checkpoint_steps`` > 0 turns on activation
    checkpointing of truncated backprop's unroll in chunks of that many steps; ``meta_loss`` and
    ``partial_truncations`` as ``Estimator`` takes them."""
    common = dict(
        tasks=tasks,
        optimizer=optimizer,
        seeds=seeds,
        unroll_length=unroll_length,
        episode_length=episode_length,
        meta_loss=meta_loss,
        seed=seed,
        partial_truncations=partial_truncations,
    )
    if config.kind == "tbptt":
        return TruncatedBackprop(**common, second_order=config.second_order, checkpoint_steps=checkpoint_steps)
    return AntitheticES(**common, pairs=config.pairs, sigma=config.sigma, persistent=config.kind == "pes")
