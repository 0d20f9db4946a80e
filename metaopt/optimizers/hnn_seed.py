"""The Hamiltonian-neural-network optimizer of "Can we learn gradients by Hamiltonian Neural
Networks?" (OPT-ML 2020), rebuilt coordinatewise. Its defaults improve on the original (a d-dimensional
state, a zero read-out, no detach); ``state="scalar"``, ``normalize_state``, ``detach_state`` and
``init="published"`` rebuild the original as published (GitHub AfoninAndrei/OPT-ML)."""

from __future__ import annotations

import ctypes
from typing import Literal

import torch
from torch import Tensor, nn

from metaopt.optimizers.base import MetaParams, NetworkOptimizer, OptState
from metaopt.optimizers.features import log_sign_constants, log_sign_preprocess
from metaopt.optimizers.ops import define_kernel_ops
from metaopt.optimizers.phnn import ACTIVATIONS, Activation


def _potential(d: int, hidden: int, depth: int, activation: str) -> nn.Sequential:
    """The shape of both G and V: Linear(d, hidden)–act–…–Linear(hidden, d), ``depth`` hidden layers
    (the original: hidden = d, depth 1, ReLU)."""
    layers: list[nn.Module] = []
    for width_in in [d] + [hidden] * (depth - 1):
        layers += [nn.Linear(width_in, hidden), ACTIVATIONS[activation]()]
    return nn.Sequential(*layers, nn.Linear(hidden, d))


class _HNNSeedNetwork(nn.Module):
    """One HNN step for rows of coordinates: (q [rows, d], p [rows, d]) -> (raw update [rows], next state
    [rows, state_size]).

    ``published``: the original's layers and init, built in its order, so that under the same
    ``torch.manual_seed`` the weights equal the original's: PyTorch's default init everywhere, L a
    ``Linear(d, d)`` whose bias is never used, and an update read-out without bias."""

    def __init__(self, d: int, hidden: int, depth: int, activation: str, state_size: int, published: bool):
        super().__init__()
        self.G = _potential(d, hidden, depth, activation)
        self.V = _potential(d, hidden, depth, activation)
        self.D = nn.Linear(2 * d, 2 * d, bias=False)
        self.L = nn.Linear(d, d) if published else nn.Parameter(torch.eye(d) + 0.01 * torch.randn(d, d))
        self.W_out = nn.Linear(2 * d, 1, bias=not published)
        if not published:
            # A zero read-out: untrained, no update. torch's random init drifts every coordinate the same
            # way (q's log-magnitude feature is nearly constant), which kept sigmoid MNIST at chance.
            nn.init.zeros_(self.W_out.weight)
            nn.init.zeros_(self.W_out.bias)
        self.W1 = nn.Linear(2 * d, state_size)

    def forward(self, q: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
        v = self.V(q)
        d_q, d_p = self.D(torch.cat([v, p], dim=-1)).chunk(2, dim=-1)
        factor = self.L.weight if isinstance(self.L, nn.Linear) else self.L
        mass = factor @ factor.T
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

    The original as published (OPT-ML's ``Optimizer_HNN``) differs in four options:
    ``state="scalar"`` keeps one scalar per coordinate (W₁ reads out 1 value, and p is that scalar,
    log/sign-preprocessed like the gradient when ``preprocess``); ``normalize_state`` divides each
    next state by its L2 norm over the optimizee's parameter vector, with no epsilon (the original on
    the quadratic, whose one tensor that is); ``detach_state`` feeds p to the network detached (the
    original with preprocessing: its ``.data`` leaves G, L, W₁ and half of D without a meta-gradient);
    ``init="published"`` is PyTorch's default init and the original's layers (below).

    ``fused_step`` runs the whole no-grad step in one native pass (``csrc/hnn_seed_step.c``), and
    first-order meta-training (depth 1, ReLU or tanh) runs through it and a hand-written backward;
    the published options run the batched update.
    Meta-parameters: 11d² + 7d + 1 at the defaults,
    i.e. 59 with preprocessing (d = 2), 19 without (d = 1); in general 2·(2dm + m + d + (depth − 1)(m² + m))
    + 7d² + 3d + 1 with m = ``hidden``. As published (scalar state, L with its unused bias, no read-out
    bias): 55 with preprocessing, 19 without.
    """

    kind = "hnn_seed"

    def __init__(
        self,
        preprocess: bool = True,
        preprocess_p: float = 10.0,
        out_mul: float = 0.1,
        hidden: int | None = None,
        depth: int = 1,
        activation: Activation = "relu",
        state: Literal["vector", "scalar"] = "vector",
        normalize_state: bool = False,
        detach_state: bool = False,
        init: Literal["metaopt", "published"] = "metaopt",
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        if (hidden is not None and hidden < 1) or depth < 1:
            raise ValueError(f"hidden and depth must be >= 1, got {hidden}, {depth}")
        if state not in ("vector", "scalar"):
            raise ValueError(f"state must be 'vector' or 'scalar', got {state!r}")
        if normalize_state and state != "scalar":
            raise ValueError("normalize_state needs state='scalar' (the original normalises its one scalar state)")
        if init not in ("metaopt", "published"):
            raise ValueError(f"init must be 'metaopt' or 'published', got {init!r}")
        self.state = state
        self.normalize_state = normalize_state
        self.detach_state = detach_state
        self.init = init
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

    @property
    def state_size(self) -> int:
        """Scalars of state per coordinate."""
        return 1 if self.state == "scalar" else self.dim

    def build_network(self) -> nn.Module:
        width = self.hidden or self.dim
        return _HNNSeedNetwork(
            self.dim, width, self.depth, self.activation, self.state_size, published=self.init == "published"
        )

    def init_state(self, params: Tensor) -> OptState:
        return {"p": params.new_zeros(params.shape + ((self.dim,) if self.state == "vector" else ()))}

    def update(self, meta_params: MetaParams, grads: Tensor, state: OptState, step: int) -> tuple[Tensor, OptState]:
        fused = self._fused_meta_update(meta_params, grads, state, step)
        if fused is not None:
            return fused
        q = self._features(grads.reshape(-1))
        p = self._features(state["p"].reshape(-1)) if self.state == "scalar" else state["p"].reshape(-1, self.dim)
        raw, p_next = self.apply(meta_params, q, p.detach() if self.detach_state else p)
        if self.state == "vector":
            return self.out_mul * raw.reshape(grads.shape), {"p": p_next.reshape(grads.shape + (self.dim,))}
        p_next = p_next.reshape(grads.shape)
        if self.normalize_state:
            p_next = p_next / torch.linalg.vector_norm(p_next, dim=-1, keepdim=True)
        return self.out_mul * raw.reshape(grads.shape), {"p": p_next}

    def _features(self, rows: Tensor) -> Tensor:
        """Per-coordinate inputs [rows, d]: log/sign-preprocessed, or as they are."""
        return log_sign_preprocess(rows, self.preprocess_p) if self.preprocess else rows[:, None]

    def _fused_unsupported(self) -> str | None:
        if (self.state, self.normalize_state, self.detach_state, self.init) != ("vector", False, False, "metaopt"):
            return "the fused hnn_seed step takes the default state, init and gradient flow, not the published ones"
        width = self.hidden or self.dim
        if width > _MAX_FUSED_WIDTH:
            return f"the fused hnn_seed step takes hidden <= {_MAX_FUSED_WIDTH}, got {width}"
        return None

    def fused_weights(self, meta_params: MetaParams) -> Tensor:
        packed = [
            meta_params[name] if name != "L" else meta_params["L"] @ meta_params["L"].T  # M = L·Lᵀ
            for name in self._packed_names()
        ]
        return torch.cat([w.reshape(-1) for w in packed]).to(torch.float32)

    def _fused_scalars(self, meta_params: MetaParams, step: int | Tensor, lr: float) -> tuple[Tensor, dict]:
        settings = dict(
            dim=self.dim,
            hidden=self.hidden or self.dim,
            depth=self.depth,
            activation=_ACTIVATION_CODES[self.activation],
            preprocess=self.preprocess,
            **log_sign_constants(self.preprocess_p),
            out_mul=self.out_mul,
            lr=lr,
        )
        return meta_params["W_out.weight"].new_zeros(0, dtype=torch.float32), settings

    def _packed_names(self) -> list[str]:
        """The meta-parameters in the kernel's weights, in its order (L's place holds M = L·Lᵀ)."""
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


_MAX_FUSED_WIDTH = 64  # MAX_WIDTH in csrc/hnn_seed_step.c


class HNNSeedKernelOptions(ctypes.Structure):
    """``Options`` of ``csrc/hnn_seed_step.c``, field by field."""

    _fields_ = [
        *((name, ctypes.c_int) for name in ("dim", "hidden", "depth", "activation", "preprocess")),
        *((name, ctypes.c_float) for name in ("threshold", "log_divisor", "small_scale", "out_mul", "lr")),
    ]


_ACTIVATION_CODES = {"relu": 0, "tanh": 1, "gelu": 2, "silu": 3}
HNN_SEED_OPS = define_kernel_ops("hnn_seed_step", HNNSeedKernelOptions)
HNNSeed.fused_kernel = HNN_SEED_OPS
