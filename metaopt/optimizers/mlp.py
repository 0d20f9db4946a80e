"""A per-parameter MLP learned optimizer in the style of Metz et al.'s ``small_fc_lopt``
(learned_optimization; "Practical tradeoffs between memory, compute, and performance in learned
optimizers", 2022)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from metaopt.optimizers.base import MetaParams, NetworkOptimizer, OptState

_RMS_EPS = 1e-8  # inside the rsqrt of the rms accumulator
_NORM_EPS = 1e-5  # inside the rsqrt of each feature's second moment, as in small_fc_lopt


def _second_moment_normalize(features: Tensor) -> Tensor:
    """``features`` [..., n, F], each feature scaled to unit mean square over the n coordinates."""
    return features * torch.rsqrt(features.square().mean(dim=-2, keepdim=True) + _NORM_EPS)


class MLPOptimizer(NetworkOptimizer):
    """A ReLU MLP shared by every coordinate, mapping momentum/RMS features to a step.

    Features per coordinate (``K = len(decays)``): the gradient, ``K`` momenta, the RMS accumulator
    and ``K`` momenta scaled by ``1/sqrt(rms)``: ``F = 2K + 2``, each normalised over the coordinates
    of one optimizee (the last dimension of ``grads``). The network outputs a direction ``d`` and a
    magnitude ``m``; the update is ``d · exp(m · exp_mult) · step_mult``.
    Meta-parameters, with ``H = hidden`` and ``D = depth``: ``(F + 1)H + (D - 1)(H + 1)H + 2(H + 1)``;
    1,474 at the defaults (F=10, H=32, D=2).
    """

    kind = "mlp"

    def __init__(
        self,
        hidden: int = 32,
        depth: int = 2,
        decays: Sequence[float] = (0.5, 0.9, 0.99, 0.999),
        rms_decay: float = 0.999,
        exp_mult: float = 0.001,
        step_mult: float = 0.001,
    ):
        self.hidden = hidden
        self.depth = depth
        self.decays = [float(decay) for decay in decays]
        self.rms_decay = rms_decay
        self.exp_mult = exp_mult
        self.step_mult = step_mult
        super().__init__()

    @property
    def num_features(self) -> int:
        """Input features per coordinate."""
        return 2 * len(self.decays) + 2

    def build_network(self) -> nn.Module:
        layers: list[nn.Module] = []
        width = self.num_features
        for _ in range(self.depth):
            layers += [nn.Linear(width, self.hidden), nn.ReLU()]
            width = self.hidden
        layers.append(nn.Linear(width, 2))
        return nn.Sequential(*layers)

    def init_state(self, params: Tensor) -> OptState:
        return {
            "momenta": params.new_zeros(params.shape + (len(self.decays),)),
            "rms": torch.zeros_like(params),
        }

    def update(self, meta_params: MetaParams, grads: Tensor, state: OptState, step: int) -> tuple[Tensor, OptState]:
        decays = torch.tensor(self.decays, dtype=grads.dtype, device=grads.device)
        momenta = decays * state["momenta"] + (1 - decays) * grads.unsqueeze(-1)
        rms = self.rms_decay * state["rms"] + (1 - self.rms_decay) * grads.square()
        scaled = momenta * torch.rsqrt(rms + _RMS_EPS).unsqueeze(-1)
        features = torch.cat([grads.unsqueeze(-1), momenta, rms.unsqueeze(-1), scaled], dim=-1)
        rows = _second_moment_normalize(features).reshape(-1, self.num_features)
        output = self.apply(meta_params, rows)
        direction, magnitude = output.unbind(-1)
        updates = direction * torch.exp(magnitude * self.exp_mult) * self.step_mult
        return updates.reshape(grads.shape), {"momenta": momenta, "rms": rms}
