"""A port-Hamiltonian learned optimizer: a learned energy, a learned positive semi-definite
dissipation and a learned input port, integrated by a symplectic step with a learned step size.

It starts as heavy-ball momentum and meta-training departs from there."""

from __future__ import annotations

import ctypes
import math
from typing import Literal

import torch
from torch import Tensor, nn

from metaopt.optimizers.base import MetaParams, NetworkOptimizer, OptState
from metaopt.optimizers.features import log_sign_constants, log_sign_preprocess
from metaopt.optimizers.ops import define_kernel_ops

HamiltonianChoice = Literal["learned", "quadratic"]
DissipationChoice = Literal["learned", "constant"]
PortChoice = Literal["learned", "identity"]
Integrator = Literal["semi_implicit_euler", "leapfrog"]
Activation = Literal["tanh", "relu", "gelu", "silu"]
ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
# The schedule's initial knots at t / horizon = 0, 1/8, ..., 1: a constant step for the first half,
# then a linear decay to zero (the best of constant, linear, cosine and this on sigmoid MNIST MLPs).
SCHEDULE_KNOTS = (1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0)


def mlp(
    inputs: int, hidden: int, outputs: int, depth: int = 1, activation: str = "tanh", bias: bool = True
) -> nn.Sequential:
    """``depth`` hidden layers of width ``hidden`` and a zero-initialised last layer, so it starts
    as the zero function."""
    last = nn.Linear(hidden, outputs, bias=bias)
    nn.init.zeros_(last.weight)
    if bias:
        nn.init.zeros_(last.bias)
    layers: list[nn.Module] = []
    for width_in in [inputs] + [hidden] * (depth - 1):
        layers += [nn.Linear(width_in, hidden), ACTIVATIONS[activation]()]
    return nn.Sequential(*layers, last)


def schedule_scale(knots: Tensor, step: int | Tensor, horizon: int, momentum: float) -> Tensor:
    """σ(t) = s(t / T) / (1 − μ₀^(t+1)) at 0-based ``step`` t and ``horizon`` T: the schedule's factor
    on the step, the piecewise-linear interpolation s of the learned ``knots`` (evenly spaced over
    [0, 1], the last one held after T, negative values read as 0) times Adam's bias correction for
    the initial momentum μ₀. ``step`` may be a tensor (a step count kept on the device)."""
    t = torch.as_tensor(step, dtype=knots.dtype, device=knots.device)
    position = (t / horizon).clamp(max=1.0) * (len(knots) - 1)
    # Linear interpolation as a sum of hat functions: no data-dependent index, so it compiles and vmaps.
    hats = (1.0 - (position - torch.arange(len(knots), dtype=knots.dtype, device=knots.device)).abs()).clamp(min=0.0)
    level = (knots * hats).sum(-1)
    return level.clamp(min=0.0) / (1.0 - momentum ** (t + 1))


class _PHNNNetwork(nn.Module):
    """One port-Hamiltonian step for rows of coordinates: (g [rows], p [rows, k]) -> (Δθ [rows], p')."""

    def __init__(
        self,
        state_dim: int,
        hidden: int,
        depth: int,
        activation: str,
        preprocess: bool,
        init_lr: float,
        init_momentum: float,
        learned_hamiltonian: bool,
        learned_dissipation: bool,
        learned_port: bool,
        state_features: bool,
        leapfrog: bool,
        sign_equivariant: bool,
        schedule: bool,
    ):
        super().__init__()
        k = state_dim
        features = 2 if preprocess and not sign_equivariant else 1
        inputs = features + (k if state_features else 0)
        h0 = math.sqrt(init_lr)
        r0 = (1.0 - init_momentum) / h0
        self.state_dim = k
        self.state_features = state_features
        self.preprocess = preprocess
        self.leapfrog = leapfrog
        self.sign_equivariant = sign_equivariant
        self.log_h = nn.Parameter(torch.tensor(math.log(h0)))
        self.A0 = nn.Parameter(math.sqrt(r0) * torch.eye(k))
        # An additive constant in H never moves p, so the energy MLP has no output bias.
        self.hamiltonian = mlp(k + features, hidden, 1, depth, activation, bias=False) if learned_hamiltonian else None
        self.dissipation = mlp(inputs, hidden, k * k, depth, activation) if learned_dissipation else None
        self.port = mlp(inputs, hidden, 2 * k, depth, activation) if learned_port else None
        # Read by PHNN.update (the network never sees the step).
        self.schedule = nn.Parameter(torch.tensor(SCHEDULE_KNOTS)) if schedule else None
        self.readout = None
        if k > 1:
            self.readout = nn.Linear(k, 1, bias=False)
            with torch.no_grad():
                self.readout.weight.zero_()
                self.readout.weight[0, 0] = 1.0

    def features(self, g: Tensor) -> tuple[Tensor, Tensor | None]:
        """The networks' input features of g [rows] -> [rows, f], and for ``sign_equivariant`` the odd
        factor [rows] that carries g's sign (the features themselves are then even in g)."""
        f = log_sign_preprocess(g) if self.preprocess else g[:, None]
        if not self.sign_equivariant:
            return f, None
        if self.preprocess:
            return f[:, :1], f[:, 1]
        return g.abs()[:, None], torch.sign(g)

    def energy(self, p: Tensor, f: Tensor) -> Tensor:
        """H(p, f) per row: ½‖p‖² plus the learned correction (made even in p for ``sign_equivariant``)."""
        kinetic = 0.5 * (p * p).sum(-1)
        if self.hamiltonian is None:
            return kinetic
        correction = self.hamiltonian(torch.cat([p, f], dim=-1)).squeeze(-1)
        if self.sign_equivariant:
            correction = 0.5 * (correction + self.hamiltonian(torch.cat([-p, f], dim=-1)).squeeze(-1))
        return kinetic + correction

    def energy_grad(self, p: Tensor, f: Tensor) -> Tensor:
        """∂H/∂p per row (rows are independent, so the gradient of the summed energy is per row)."""
        return torch.func.grad(lambda p_: self.energy(p_, f).sum())(p)

    def rate(self, g: Tensor, f: Tensor, odd: Tensor | None, p: Tensor, dh_dp: Tensor) -> Tensor:
        """ṗ = −R·∂H/∂p + u with R = A·Aᵀ and the port force u."""
        inputs = f
        if self.state_features:
            inputs = torch.cat([f, p if odd is None else p * odd[:, None]], dim=-1)
        a = self.A0
        if self.dissipation is not None:
            a = a + self.dissipation(inputs).reshape(-1, self.state_dim, self.state_dim)
        r = a @ a.transpose(-1, -2)
        damping = (r @ dh_dp.unsqueeze(-1)).squeeze(-1)
        if self.port is None:
            force = -g[:, None]
        else:
            gain, offset = self.port(inputs).chunk(2, dim=-1)
            if odd is not None:
                offset = offset * odd[:, None]
            force = -(g[:, None] * (1 + gain) + offset)
        return force - damping

    def read(self, dh_dp: Tensor) -> Tensor:
        """The scalar velocity per row: ∂H/∂p itself for k = 1, else a learned projection."""
        if self.readout is None:
            return dh_dp[:, 0]
        return self.readout(dh_dp).squeeze(-1)

    def forward(self, g: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
        f, odd = self.features(g)
        h = self.log_h.exp()
        if not self.leapfrog:
            p_next = p + h * self.rate(g, f, odd, p, self.energy_grad(p, f))
            return h * self.read(self.energy_grad(p_next, f)), p_next
        p_half = p + 0.5 * h * self.rate(g, f, odd, p, self.energy_grad(p, f))
        dh_dp_half = self.energy_grad(p_half, f)
        p_next = p_half + 0.5 * h * self.rate(g, f, odd, p_half, dh_dp_half)
        return h * self.read(dh_dp_half), p_next


class PHNN(NetworkOptimizer):
    """Port-Hamiltonian optimizer: per coordinate a momentum-like state p ∈ R^k (k = ``state_dim``).

    Energy H(p, f) = ½‖p‖² + MLP_H([p, f]) with f = log_sign_preprocess(g) (f = g with
    ``preprocess=False``); every MLP has ``depth`` hidden layers of width ``hidden``; dissipation
    R = A·Aᵀ, A = A₀ + MLP_R(f); port u = −(g·(1 + gain(f)) + offset(f)) (gain, offset ∈ R^k);
    ``state_features`` also feeds p to MLP_R and the port. Step size h = exp(log_h).
    ``sign_equivariant`` makes the step flip with the gradient: (g, p) -> (−g, −p) gives (−Δθ, −p').
    The MLPs then see only even features (log|g|; |g| without ``preprocess``; for ``state_features``
    p·sign g, whether the momentum agrees with the gradient), the port's offset is multiplied by
    sign g (e^10·g below e^-10), and the learned energy is averaged over ±p, which costs a second
    pass through MLP_H. Without it a trained phnn can push coordinates whose gradient is zero one way
    every step.
    ``normalize`` replaces g by g / (√v̂ + ε) throughout, with v̂ Adam's bias-corrected running mean
    of g² (decay ``rms_decay``, one more float of state per coordinate), so the step no longer
    scales with the gradient's size (meant for carrying an optimizer from sigmoid to ReLU networks).
    ``horizon`` (T, the number of steps a run takes) turns on a learned step schedule: every step Δθ
    is multiplied by σ(t) = s(t / T) / (1 − μ₀^(t+1)), with s piecewise linear through 9 learned
    knots (``SCHEDULE_KNOTS`` at the start: constant, then a linear decay to 0 over the second half)
    and μ₀ = ``init_momentum``; the division is Adam's bias correction of the momentum, which makes
    the first steps full-sized instead of (1 − μ₀) of it. Set T to the length of the runs it will
    optimize (the schedule stretches with it; after T the last knot holds, 0 at the start).

    ``semi_implicit_euler``: p' = p + h·(−R·∂H/∂p(p) + u), Δθ = h·read(∂H/∂p(p')).
    ``leapfrog``: p½ = p + h/2·(−R·∂H/∂p(p) + u), Δθ = h·read(∂H/∂p(p½)),
    p' = p½ + h/2·(−R·∂H/∂p(p½) + u(p½)). Approximation: the second half-kick reuses this step's
    gradient g (the one at the new θ is not available yet) and evaluates the dissipation
    explicitly at p½ instead of implicitly at p'.

    All last layers start at zero, h₀ = √init_lr and A₀ = √((1 − init_momentum)/h₀)·I, so at
    initialisation it is exactly heavy ball: lr = h², momentum = 1 − h·R, p = −h·buf.

    Meta-parameters, with m = ``hidden``, f = 2 (1 without ``preprocess`` or with
    ``sign_equivariant``), i = f (+ k with ``state_features``) and at depth 1: 1 (log_h) + k² (A₀)
    + (k + f + 2)·m (learned H, no output bias) + (i + 1)·m + m·k² + k² (learned R) + (i + 1)·m
    + 2k·m + 2k (learned port) + k (read-out, only for k > 1) + 9 (``horizon``); each extra hidden
    layer adds m² + m per learned MLP. 229 at the defaults (k = 1, m = 16, all learned), 181 with
    ``sign_equivariant``, 2 with everything fixed.

    ``fused_step`` runs the no-grad step in one native pass (``csrc/phnn_step.c``) for k = 1, depth 1,
    tanh and the semi-implicit Euler step, with or without ``normalize``, ``sign_equivariant``,
    ``state_features``, ``horizon`` (σ(t) scales its lr), preprocessing and each learned part.
    """

    kind = "phnn"

    def __init__(
        self,
        state_dim: int = 1,
        hidden: int = 16,
        depth: int = 1,
        activation: Activation = "tanh",
        preprocess: bool = True,
        init_lr: float = 0.01,
        init_momentum: float = 0.9,
        hamiltonian: HamiltonianChoice = "learned",
        dissipation: DissipationChoice = "learned",
        port: PortChoice = "learned",
        integrator: Integrator = "semi_implicit_euler",
        state_features: bool = False,
        normalize: bool = False,
        rms_decay: float = 0.999,
        sign_equivariant: bool = False,
        horizon: int | None = None,
    ):
        for name, value, allowed in (
            ("hamiltonian", hamiltonian, ("learned", "quadratic")),
            ("dissipation", dissipation, ("learned", "constant")),
            ("port", port, ("learned", "identity")),
            ("integrator", integrator, ("semi_implicit_euler", "leapfrog")),
            ("activation", activation, tuple(ACTIVATIONS)),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if init_lr <= 0 or not 0 <= init_momentum <= 1:
            raise ValueError("need init_lr > 0 and 0 <= init_momentum <= 1")
        if horizon is not None and (horizon < 1 or init_momentum == 1):
            raise ValueError(
                f"horizon (the steps of a run, {horizon}) must be >= 1 and needs init_momentum < 1 "
                "(the schedule divides the step by 1 - init_momentum^(t+1))"
            )
        if not 0 < rms_decay < 1:
            raise ValueError(f"rms_decay must be in (0, 1), got {rms_decay}")
        if state_dim < 1 or hidden < 1 or depth < 1:
            raise ValueError(f"state_dim, hidden and depth must be >= 1, got {state_dim}, {hidden}, {depth}")
        self.state_dim = state_dim
        self.hidden = hidden
        self.depth = depth
        self.activation = activation
        self.preprocess = preprocess
        self.init_lr = init_lr
        self.init_momentum = init_momentum
        self.hamiltonian = hamiltonian
        self.dissipation = dissipation
        self.port = port
        self.integrator = integrator
        self.state_features = state_features
        self.normalize = normalize
        self.rms_decay = rms_decay
        self.sign_equivariant = sign_equivariant
        self.horizon = horizon
        super().__init__()

    def with_horizon(self, horizon: int) -> PHNN:
        if self.horizon is None:
            return super().with_horizon(horizon)
        return PHNN(**{**self.hyperparameters(), "horizon": horizon})

    def build_network(self) -> nn.Module:
        return _PHNNNetwork(
            state_dim=self.state_dim,
            hidden=self.hidden,
            depth=self.depth,
            activation=self.activation,
            preprocess=self.preprocess,
            init_lr=self.init_lr,
            init_momentum=self.init_momentum,
            learned_hamiltonian=self.hamiltonian == "learned",
            learned_dissipation=self.dissipation == "learned",
            learned_port=self.port == "learned",
            state_features=self.state_features,
            leapfrog=self.integrator == "leapfrog",
            sign_equivariant=self.sign_equivariant,
            schedule=self.horizon is not None,
        )

    def init_state(self, params: Tensor) -> OptState:
        state = {"p": params.new_zeros(params.shape + (self.state_dim,))}
        if self.normalize:
            state["v"] = params.new_zeros(params.shape)
        return state

    def update(self, meta_params: MetaParams, grads: Tensor, state: OptState, step: int) -> tuple[Tensor, OptState]:
        fused = self._fused_meta_update(meta_params, grads, state, step)
        if fused is not None:
            return fused
        k = self.state_dim
        new_state = {}
        if self.normalize:
            beta = self.rms_decay
            new_state["v"] = v = beta * state["v"] + (1 - beta) * grads * grads
            grads = grads / ((v / (1 - beta ** (step + 1))).sqrt() + 1e-8)
        updates, p = self.apply(meta_params, grads.reshape(-1), state["p"].reshape(-1, k))
        if self.horizon is not None:
            updates = updates * schedule_scale(meta_params["schedule"], step, self.horizon, self.init_momentum)
        return updates.reshape(grads.shape), {"p": p.reshape(grads.shape + (k,)), **new_state}

    def _fused_unsupported(self) -> str | None:
        refused = [
            name
            for name, off in (
                ("state_dim != 1", self.state_dim != 1),
                ("depth != 1", self.depth != 1),
                ("activation != 'tanh'", self.activation != "tanh"),
                ("leapfrog", self.integrator == "leapfrog"),
                (f"hidden > {_MAX_FUSED_WIDTH}", self.hidden > _MAX_FUSED_WIDTH),
            )
            if off
        ]
        return f"the fused phnn step does not take {', '.join(refused)}" if refused else None

    def fused_weights(self, meta_params: MetaParams) -> Tensor:
        packed = [meta_params[name] for name in self._packed_names()]
        return torch.cat([w.reshape(-1).float() for w in packed]) if packed else meta_params["log_h"].new_zeros(1)

    def _fused_scalars(self, meta_params: MetaParams, step: int | Tensor, lr: float) -> tuple[Tensor, dict]:
        """The scalars (h, A₀, the bias correction and the scheduled lr, as PHNN_OPS orders them) and
        settings of ``csrc/phnn_step.c``."""
        log_h = meta_params["log_h"].float().reshape(())
        if self.horizon is not None:
            lr = lr * schedule_scale(meta_params["schedule"].float(), step, self.horizon, self.init_momentum)
        beta, learned = self.rms_decay, self._learned_parts()
        correction = torch.as_tensor(1 - beta ** (step + 1), dtype=torch.float32, device=log_h.device)
        lr = torch.as_tensor(lr, dtype=torch.float32, device=log_h.device)
        scalars = torch.stack([log_h.exp(), meta_params["A0"].float().reshape(()), correction, lr.reshape(())])
        settings = dict(
            hidden=self.hidden,
            preprocess=self.preprocess,
            learned_energy=learned["hamiltonian"],
            learned_dissipation=learned["dissipation"],
            learned_port=learned["port"],
            normalize=self.normalize,
            equivariant=self.sign_equivariant,
            state_features=self.state_features,
            **log_sign_constants(),
            beta=beta,
            one_minus_beta=1 - beta,
        )
        return scalars, settings

    def _learned_parts(self) -> dict[str, bool]:
        """Which of the energy, dissipation and port are learned MLPs, in the kernel's order."""
        return {
            "hamiltonian": self.hamiltonian == "learned",
            "dissipation": self.dissipation == "learned",
            "port": self.port == "learned",
        }

    def _packed_names(self) -> list[str]:
        layers = {
            "hamiltonian": ("0.weight", "0.bias", "2.weight"),
            "dissipation": ("0.weight", "0.bias", "2.weight", "2.bias"),
            "port": ("0.weight", "0.bias", "2.weight", "2.bias"),
        }
        learned = self._learned_parts()
        return [f"{part}.{name}" for part, names in layers.items() if learned[part] for name in names]

    def _fused_meta_supported(self) -> bool:
        return all(self._learned_parts().values()) and not (
            self.sign_equivariant or self.state_features or self.horizon is not None
        )


_MAX_FUSED_WIDTH = 64  # MAX_WIDTH in csrc/phnn_step.c


class PHNNKernelOptions(ctypes.Structure):
    """``Options`` of ``csrc/phnn_step.c``, field by field."""

    _fields_ = [
        *(
            (name, ctypes.c_int)
            for name in (
                "hidden",
                "preprocess",
                "learned_energy",
                "learned_dissipation",
                "learned_port",
                "normalize",
                "equivariant",
                "state_features",
            )
        ),
        *(
            (name, ctypes.c_float)
            for name in (
                "h",
                "a0",
                "threshold",
                "log_divisor",
                "small_scale",
                "beta",
                "one_minus_beta",
                "correction",
                "lr",
            )
        ),
    ]


PHNN_OPS = define_kernel_ops(
    "phnn_step",
    PHNNKernelOptions,
    scalars=("h", "a0", "correction", "lr"),
    differentiable=("h", "a0"),
    cuda="metaopt.optimizers.triton_phnn",
)
PHNN.fused_kernel = PHNN_OPS
