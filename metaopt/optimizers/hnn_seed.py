"""The Hamiltonian-neural-network optimizer of "Can we learn gradients by Hamiltonian Neural
Networks?" (OPT-ML 2020), rebuilt coordinatewise and without the original's detach and
cross-coordinate normalisation."""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor, nn

from metaopt.optimizers.base import MetaParams, NetworkOptimizer, OptState
from metaopt.optimizers.features import log_sign_constants, log_sign_preprocess
from metaopt.optimizers.phnn import ACTIVATIONS, Activation


def _potential(d: int, hidden: int, depth: int, activation: str) -> nn.Sequential:
    """The shape of both G and V: Linear(d, hidden)–act–…–Linear(hidden, d), ``depth`` hidden layers
    (the original: hidden = d, depth 1, ReLU)."""
    layers: list[nn.Module] = []
    for width_in in [d] + [hidden] * (depth - 1):
        layers += [nn.Linear(width_in, hidden), ACTIVATIONS[activation]()]
    return nn.Sequential(*layers, nn.Linear(hidden, d))


class _HNNSeedNetwork(nn.Module):
    """One HNN step for rows of coordinates: (q [rows, d], p [rows, d]) -> (raw update [rows], next p)."""

    def __init__(self, d: int, hidden: int, depth: int, activation: str):
        super().__init__()
        self.G = _potential(d, hidden, depth, activation)
        self.V = _potential(d, hidden, depth, activation)
        self.D = nn.Linear(2 * d, 2 * d, bias=False)
        self.L = nn.Parameter(torch.eye(d) + 0.01 * torch.randn(d, d))
        self.W_out = nn.Linear(2 * d, 1)
        # A zero read-out: untrained, no update. torch's random init drifts every coordinate the same
        # way (q's log-magnitude feature is nearly constant), which kept sigmoid MNIST at chance.
        nn.init.zeros_(self.W_out.weight)
        nn.init.zeros_(self.W_out.bias)
        self.W1 = nn.Linear(2 * d, d)

    def forward(self, q: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
        v = self.V(q)
        d_q, d_p = self.D(torch.cat([v, p], dim=-1)).chunk(2, dim=-1)
        mass = self.L @ self.L.T
        q_dot = p - d_q
        p_dot = (-v - d_p + self.G(q)) @ mass
        update = self.W_out(torch.cat([q_dot, q], dim=-1)).squeeze(-1)
        return update, self.W1(torch.cat([q_dot, p_dot], dim=-1))


class HNNSeed(NetworkOptimizer):
    """The OPT-ML 2020 HNN optimizer: per coordinate, q = the (preprocessed) gradient, p = a state.

    With d = 2 if ``preprocess`` else 1: q̇ = p − D_q, ṗ = (−V(q) − D_p + G(q))·M with
    [D_q, D_p] = D·[V(q), p] and M = L·Lᵀ; the update is ``out_mul`` · W_out·[q̇, q] and the next
    state W₁·[q̇, ṗ] + b₁. G and V have ``depth`` hidden layers of width ``hidden`` (default d, as in
    the original) with ``activation`` (default ReLU). W_out starts at zero (untrained: no update).
    ``fused_step`` runs the whole no-grad step in one native pass (``csrc/hnn_seed_step.c``), and
    first-order meta-training (depth 1, ReLU or tanh) runs through it and a hand-written backward.
    Meta-parameters: 11d² + 7d + 1 at the defaults,
    i.e. 59 with preprocessing (d = 2), 19 without (d = 1); in general 2·(2dm + m + d + (depth − 1)(m² + m))
    + 7d² + 3d + 1 with m = ``hidden``.
    """

    kind = "hnn_seed"
    fused_kernel = "hnn_seed_step"

    def __init__(
        self,
        preprocess: bool = True,
        preprocess_p: float = 10.0,
        out_mul: float = 0.1,
        hidden: int | None = None,
        depth: int = 1,
        activation: Activation = "relu",
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        if (hidden is not None and hidden < 1) or depth < 1:
            raise ValueError(f"hidden and depth must be >= 1, got {hidden}, {depth}")
        self.hidden = hidden
        self.depth = depth
        self.activation = activation
        self.preprocess = preprocess
        self.preprocess_p = preprocess_p
        self.out_mul = out_mul
        super().__init__()

    @property
    def dim(self) -> int:
        """Per-coordinate size d of q and p."""
        return 2 if self.preprocess else 1

    def build_network(self) -> nn.Module:
        return _HNNSeedNetwork(self.dim, self.hidden or self.dim, self.depth, self.activation)

    def init_state(self, params: Tensor) -> OptState:
        return {"p": params.new_zeros(params.shape + (self.dim,))}

    def update(self, meta_params: MetaParams, grads: Tensor, state: OptState, step: int) -> tuple[Tensor, OptState]:
        fused = self._fused_meta_update(meta_params, grads, state, step)
        if fused is not None:
            return fused
        rows = grads.reshape(-1)
        q = log_sign_preprocess(rows, self.preprocess_p) if self.preprocess else rows[:, None]
        raw, p = self.apply(meta_params, q, state["p"].reshape(-1, self.dim))
        return self.out_mul * raw.reshape(grads.shape), {"p": p.reshape(grads.shape + (self.dim,))}

    def _fused_unsupported(self) -> str | None:
        width = self.hidden or self.dim
        if width > _MAX_FUSED_WIDTH:
            return f"the fused hnn_seed step takes hidden <= {_MAX_FUSED_WIDTH}, got {width}"
        return None

    def _fused_inputs(self, meta_params: MetaParams, step: int, lr: float) -> tuple[Tensor, HNNSeedKernelOptions]:
        width = self.hidden or self.dim
        packed = [
            meta_params[name] if name != "L" else meta_params["L"] @ meta_params["L"].T  # M = L·Lᵀ
            for name in self._packed_names()
        ]
        weights = torch.cat([w.detach().reshape(-1) for w in packed]).to(torch.float32)
        options = HNNSeedKernelOptions(
            dim=self.dim,
            hidden=width,
            depth=self.depth,
            activation=_ACTIVATION_CODES[self.activation],
            preprocess=self.preprocess,
            **log_sign_constants(self.preprocess_p),
            out_mul=self.out_mul,
            lr=lr,
        )
        return weights, options

    def _packed_names(self) -> list[str]:
        names = [name for name, _ in self.network.named_parameters()]
        return [name for net in ("G.", "V.") for name in names if name.startswith(net)] + [
            "D.weight",
            "L",
            "W_out.weight",
            "W_out.bias",
            "W1.weight",
            "W1.bias",
        ]

    def _fused_meta_supported(self) -> bool:
        return self.depth == 1 and self.activation in ("relu", "tanh")

    def _fused_meta_grads(self, sums: Tensor, meta_params: MetaParams, options: HNNSeedKernelOptions) -> MetaParams:
        grads = super()._fused_meta_grads(sums, meta_params, options)
        grad_m = grads["L"]  # the kernel's gradient is w.r.t. M = L·Lᵀ
        grads["L"] = (grad_m + grad_m.T) @ meta_params["L"].detach()
        return grads


_MAX_FUSED_WIDTH = 64  # MAX_WIDTH in csrc/hnn_seed_step.c


class HNNSeedKernelOptions(ctypes.Structure):
    """``Options`` of ``csrc/hnn_seed_step.c``, field by field."""

    _fields_ = [
        *((name, ctypes.c_int) for name in ("dim", "hidden", "depth", "activation", "preprocess")),
        *((name, ctypes.c_float) for name in ("threshold", "log_divisor", "small_scale", "out_mul", "lr")),
    ]


_ACTIVATION_CODES = {"relu": 0, "tanh": 1, "gelu": 2, "silu": 3}
