"""phnn's step and its backward in Triton: the CUDA implementations of ``metaopt::phnn_step``,
``metaopt::phnn_step_`` and ``metaopt::phnn_step_backward`` (``csrc/phnn_step.c`` computes the same
on the CPU).

One program steps ``BLOCK`` coordinates; the settings that shape the computation (the learned parts,
normalisation, sign equivariance, state features, the hidden width) are compile-time constants, so each
shipped shape is its own specialised kernel. Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors,
which is how the tests check them (the step against the batched update, the backward against the C one)
on machines without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from metaopt.optimizers.native import FusedUnsupported

BLOCK = 256


def weight_layout(hidden: int, features: int, inputs: int, energy: bool, dissipation: bool, port: bool) -> dict:
    """Where each learned part's weights start in the packed weights (``weight_layout`` of phnn_step.c)."""
    o = {"energy_W": 0, "energy_b": hidden * (1 + features)}
    o["energy_w"] = o["energy_b"] + hidden
    o["dissipation_W"] = o["energy_w"] + hidden if energy else 0
    o["dissipation_b"] = o["dissipation_W"] + hidden * inputs
    o["dissipation_w"] = o["dissipation_b"] + hidden
    o["dissipation_c"] = o["dissipation_w"] + hidden
    o["port_W"] = o["dissipation_c"] + 1 if dissipation else o["dissipation_W"]
    o["port_b"] = o["port_W"] + hidden * inputs
    o["port_w"] = o["port_b"] + hidden
    o["port_c"] = o["port_w"] + 2 * hidden
    return o


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _hidden_input(
    w_ptr,
    W: tl.constexpr,
    b: tl.constexpr,
    j: tl.constexpr,
    f0,
    f1,
    f_state,
    FEATURES: tl.constexpr,
    INPUTS: tl.constexpr,
    STATE_FEATURES: tl.constexpr,
):
    """z_j = W_j · [f, state feature] + b_j of the dissipation's or the port's hidden layer."""
    z = tl.load(w_ptr + b + j) + tl.load(w_ptr + W + j * INPUTS) * f0
    if FEATURES == 2:
        z += tl.load(w_ptr + W + j * INPUTS + 1) * f1
    if STATE_FEATURES:
        z += tl.load(w_ptr + W + j * INPUTS + FEATURES) * f_state
    return z


@triton.jit
def _features(g, threshold, log_divisor, small_scale, PREPROCESS: tl.constexpr, EQUIVARIANT: tl.constexpr):
    """The networks' features f0, f1 of the (normalised) gradient g and the odd factor that carries its
    sign (phnn_step.c's f and odd; f1 is read only where there are two features)."""
    sign = tl.where(g > 0.0, 1.0, 0.0) - tl.where(g < 0.0, 1.0, 0.0)
    if PREPROCESS:
        magnitude = tl.abs(g)
        large = magnitude >= threshold
        f0 = tl.where(large, tl.log(tl.maximum(magnitude, threshold)) / log_divisor, -1.0)
        odd = tl.where(large, sign, g * small_scale)
        f1 = odd
    else:
        f0 = tl.abs(g) if EQUIVARIANT else g
        odd = sign
        f1 = g
    return f0, f1, odd


@triton.jit
def _energy_input(w_ptr, W: tl.constexpr, b: tl.constexpr, j: tl.constexpr, f0, f1, FEATURES: tl.constexpr):
    """The gradient features' part of the energy's hidden input j: b_j + Σ_c W_j,1+c f_c."""
    row = W + j * (1 + FEATURES)
    z = tl.load(w_ptr + b + j) + tl.load(w_ptr + row + 1) * f0
    if FEATURES == 2:
        z += tl.load(w_ptr + row + 2) * f1
    return z


@triton.jit
def _energy_grad(
    w_ptr,
    W: tl.constexpr,
    b: tl.constexpr,
    wv: tl.constexpr,
    p,
    f0,
    f1,
    FEATURES: tl.constexpr,
    HIDDEN: tl.constexpr,
    EVEN: tl.constexpr,
):
    """∂H/∂p = p + Σ_j w_j (1 − tanh²(z_j)) W_j0 with z = W [p, f] + b; EVEN: of H averaged over ±p."""
    total = p
    for j in tl.static_range(HIDDEN):
        z = _energy_input(w_ptr, W, b, j, f0, f1, FEATURES)
        w_p = tl.load(w_ptr + W + j * (1 + FEATURES))
        t = _tanh(z + w_p * p)
        if EVEN:
            t_minus = _tanh(z - w_p * p)
            total += 0.5 * tl.load(w_ptr + wv + j) * ((1.0 - t * t) - (1.0 - t_minus * t_minus)) * w_p
        else:
            total += tl.load(w_ptr + wv + j) * (1.0 - t * t) * w_p
    return total


@triton.jit
def _phnn_step_kernel(
    grad_ptr,
    p_ptr,
    v_ptr,
    update_ptr,
    p_out_ptr,
    v_out_ptr,
    w_ptr,
    scalars_ptr,
    n,
    threshold,
    log_divisor,
    small_scale,
    beta,
    one_minus_beta,
    HIDDEN: tl.constexpr,
    PREPROCESS: tl.constexpr,
    LEARNED_ENERGY: tl.constexpr,
    LEARNED_DISSIPATION: tl.constexpr,
    LEARNED_PORT: tl.constexpr,
    NORMALIZE: tl.constexpr,
    EQUIVARIANT: tl.constexpr,
    STATE_FEATURES: tl.constexpr,
    FEATURES: tl.constexpr,
    INPUTS: tl.constexpr,
    E_W: tl.constexpr,
    E_B: tl.constexpr,
    E_WV: tl.constexpr,
    D_W: tl.constexpr,
    D_B: tl.constexpr,
    D_WV: tl.constexpr,
    D_C: tl.constexpr,
    P_W: tl.constexpr,
    P_B: tl.constexpr,
    P_WV: tl.constexpr,
    P_C: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # past 2³¹ coordinates too
    mask = offsets < n
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0)
    h, a0 = tl.load(scalars_ptr), tl.load(scalars_ptr + 1)
    correction, lr = tl.load(scalars_ptr + 2), tl.load(scalars_ptr + 3)
    if NORMALIZE:
        v = beta * tl.load(v_ptr + offsets, mask=mask, other=0.0) + one_minus_beta * g * g
        tl.store(v_out_ptr + offsets, v, mask=mask)
        g = g / (tl.sqrt(v / correction) + 1e-8)
    f0, f1, odd = _features(g, threshold, log_divisor, small_scale, PREPROCESS, EQUIVARIANT)
    p = tl.load(p_ptr + offsets, mask=mask, other=0.0)
    f_state = p * odd if EQUIVARIANT else p
    if LEARNED_ENERGY:
        dh_dp = _energy_grad(w_ptr, E_W, E_B, E_WV, p, f0, f1, FEATURES, HIDDEN, EQUIVARIANT)
    else:
        dh_dp = p
    a = a0 + tl.zeros_like(g)
    gain = tl.zeros_like(g)
    offset = tl.zeros_like(g)
    if LEARNED_DISSIPATION or LEARNED_PORT:
        a_sum = tl.zeros_like(g)
        if LEARNED_DISSIPATION:
            a_sum += tl.load(w_ptr + D_C)
        if LEARNED_PORT:
            gain += tl.load(w_ptr + P_C)
            offset += tl.load(w_ptr + P_C + 1)
        for j in tl.static_range(HIDDEN):
            if LEARNED_DISSIPATION:
                z = _hidden_input(w_ptr, D_W, D_B, j, f0, f1, f_state, FEATURES, INPUTS, STATE_FEATURES)
                a_sum += tl.load(w_ptr + D_WV + j) * _tanh(z)
            if LEARNED_PORT:
                t = _tanh(_hidden_input(w_ptr, P_W, P_B, j, f0, f1, f_state, FEATURES, INPUTS, STATE_FEATURES))
                gain += tl.load(w_ptr + P_WV + j) * t
                offset += tl.load(w_ptr + P_WV + HIDDEN + j) * t
        a = a0 + a_sum
        if EQUIVARIANT:
            offset = offset * odd
    force = -(g * (1.0 + gain) + offset) if LEARNED_PORT else -g
    p_next = p + h * (force - a * a * dh_dp)
    tl.store(p_out_ptr + offsets, p_next, mask=mask)
    if LEARNED_ENERGY:
        velocity = _energy_grad(w_ptr, E_W, E_B, E_WV, p_next, f0, f1, FEATURES, HIDDEN, EQUIVARIANT)
    else:
        velocity = p_next
    tl.store(update_ptr + offsets, lr * (h * velocity), mask=mask)


@triton.jit
def _store_sum(partial_ptr, k, x):
    """This program's sum of x over its coordinates into its row of the partial sums, at column k."""
    tl.store(partial_ptr + k, tl.sum(x, axis=0))


@triton.jit
def _phnn_step_backward_kernel(
    grad_ptr,
    p_ptr,
    v_ptr,
    grad_update_ptr,
    grad_p_next_ptr,
    grad_p_ptr,
    w_ptr,
    scalars_ptr,
    partial_ptr,
    n,
    threshold,
    log_divisor,
    small_scale,
    beta,
    one_minus_beta,
    HIDDEN: tl.constexpr,
    PREPROCESS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    FEATURES: tl.constexpr,
    E_W: tl.constexpr,
    E_B: tl.constexpr,
    E_WV: tl.constexpr,
    D_W: tl.constexpr,
    D_B: tl.constexpr,
    D_WV: tl.constexpr,
    D_C: tl.constexpr,
    P_W: tl.constexpr,
    P_B: tl.constexpr,
    P_WV: tl.constexpr,
    P_C: tl.constexpr,
    SUMS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """phnn_step_backward of csrc/phnn_step.c (every part learned, not sign-equivariant, no state
    features): dL/dp into grad_p, and this program's sums of the weights' gradients, then dL/dh and
    dL/dA₀, into row program_id of the partial sums. Coordinates past n have no upstream gradient, so
    they add nothing."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    partial_ptr += tl.program_id(0).to(tl.int64) * SUMS
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0)
    h, a0, correction = tl.load(scalars_ptr), tl.load(scalars_ptr + 1), tl.load(scalars_ptr + 2)
    if NORMALIZE:
        v = beta * tl.load(v_ptr + offsets, mask=mask, other=0.0) + one_minus_beta * g * g
        g = g / (tl.sqrt(v / correction) + 1e-8)
    f0, f1, _ = _features(g, threshold, log_divisor, small_scale, PREPROCESS, False)
    p = tl.load(p_ptr + offsets, mask=mask, other=0.0)
    grad_update = tl.load(grad_update_ptr + offsets, mask=mask, other=0.0)
    grad_p_next = tl.load(grad_p_next_ptr + offsets, mask=mask, other=0.0)

    # The forward: ∂H/∂p (energy) and ∂²H/∂p² (slope) at p, the dissipation's a, the port's gain and offset.
    energy = p
    slope = tl.full(p.shape, 1.0, tl.float32)
    a = a0 + tl.load(w_ptr + D_C) + tl.zeros_like(p)
    gain = tl.load(w_ptr + P_C) + tl.zeros_like(p)
    offset = tl.load(w_ptr + P_C + 1) + tl.zeros_like(p)
    for j in tl.static_range(HIDDEN):
        w0, wj = tl.load(w_ptr + E_W + j * (1 + FEATURES)), tl.load(w_ptr + E_WV + j)
        t = _tanh(_energy_input(w_ptr, E_W, E_B, j, f0, f1, FEATURES) + w0 * p)
        energy += wj * (1.0 - t * t) * w0
        slope -= 2.0 * wj * w0 * w0 * t * (1.0 - t * t)
        a += tl.load(w_ptr + D_WV + j) * _tanh(_hidden_input(w_ptr, D_W, D_B, j, f0, f1, p, FEATURES, FEATURES, 0))
        q = _tanh(_hidden_input(w_ptr, P_W, P_B, j, f0, f1, p, FEATURES, FEATURES, 0))
        gain += tl.load(w_ptr + P_WV + j) * q
        offset += tl.load(w_ptr + P_WV + HIDDEN + j) * q
    rate = -(g * (1.0 + gain) + offset) - a * a * energy
    p_next = p + h * rate
    energy_next = p_next
    slope_next = tl.full(p.shape, 1.0, tl.float32)
    for j in tl.static_range(HIDDEN):
        w0, wj = tl.load(w_ptr + E_W + j * (1 + FEATURES)), tl.load(w_ptr + E_WV + j)
        t = _tanh(_energy_input(w_ptr, E_W, E_B, j, f0, f1, FEATURES) + w0 * p_next)
        energy_next += wj * (1.0 - t * t) * w0
        slope_next -= 2.0 * wj * w0 * w0 * t * (1.0 - t * t)

    # Δθ = h ∂H/∂p(p'), p' = p + h (−(g (1 + gain) + offset) − a² ∂H/∂p(p))
    bar_p_next = grad_p_next + grad_update * h * slope_next
    tl.store(grad_p_ptr + offsets, bar_p_next * (1.0 - h * a * a * slope), mask=mask)
    alpha_next = grad_update * h
    alpha = -bar_p_next * h * a * a
    bar_a = -2.0 * bar_p_next * h * a * energy
    bar_gain = -bar_p_next * h * g
    bar_offset = -bar_p_next * h
    _store_sum(partial_ptr, SUMS - 2, grad_update * energy_next + bar_p_next * rate)  # dL/dh
    _store_sum(partial_ptr, SUMS - 1, bar_a)  # dL/dA₀
    _store_sum(partial_ptr, D_C, bar_a)
    _store_sum(partial_ptr, P_C, bar_gain)
    _store_sum(partial_ptr, P_C + 1, bar_offset)
    for j in tl.static_range(HIDDEN):
        w0, wj = tl.load(w_ptr + E_W + j * (1 + FEATURES)), tl.load(w_ptr + E_WV + j)
        z = _energy_input(w_ptr, E_W, E_B, j, f0, f1, FEATURES)
        t_p, t_next = _tanh(z + w0 * p), _tanh(z + w0 * p_next)
        s_p, s_next = 1.0 - t_p * t_p, 1.0 - t_next * t_next
        kappa_p, kappa_next = -2.0 * wj * w0 * t_p * s_p, -2.0 * wj * w0 * t_next * s_next
        bar_z = alpha_next * kappa_next + alpha * kappa_p  # through ∂H/∂p's tanh arguments
        _store_sum(partial_ptr, E_WV + j, (alpha_next * s_next + alpha * s_p) * w0)
        _store_sum(
            partial_ptr,
            E_W + j * (1 + FEATURES),
            alpha_next * (wj * s_next + kappa_next * p_next) + alpha * (wj * s_p + kappa_p * p),
        )
        _store_sum(partial_ptr, E_B + j, bar_z)
        r = _tanh(_hidden_input(w_ptr, D_W, D_B, j, f0, f1, p, FEATURES, FEATURES, 0))
        bar_y = bar_a * tl.load(w_ptr + D_WV + j) * (1.0 - r * r)
        _store_sum(partial_ptr, D_WV + j, bar_a * r)
        _store_sum(partial_ptr, D_B + j, bar_y)
        q = _tanh(_hidden_input(w_ptr, P_W, P_B, j, f0, f1, p, FEATURES, FEATURES, 0))
        gain_w, offset_w = tl.load(w_ptr + P_WV + j), tl.load(w_ptr + P_WV + HIDDEN + j)
        bar_x = (bar_gain * gain_w + bar_offset * offset_w) * (1.0 - q * q)
        _store_sum(partial_ptr, P_WV + j, bar_gain * q)
        _store_sum(partial_ptr, P_WV + HIDDEN + j, bar_offset * q)
        _store_sum(partial_ptr, P_B + j, bar_x)
        _store_sum(partial_ptr, E_W + j * (1 + FEATURES) + 1, bar_z * f0)
        _store_sum(partial_ptr, D_W + j * FEATURES, bar_y * f0)
        _store_sum(partial_ptr, P_W + j * FEATURES, bar_x * f0)
        if FEATURES == 2:
            _store_sum(partial_ptr, E_W + j * (1 + FEATURES) + 2, bar_z * f1)
            _store_sum(partial_ptr, D_W + j * FEATURES + 1, bar_y * f1)
            _store_sum(partial_ptr, P_W + j * FEATURES + 1, bar_x * f1)


def kernel_constants(settings: dict) -> dict:
    """The kernel's compile-time constants for the ops' ``settings``: its shape and weight offsets."""
    features = 2 if settings["preprocess"] and not settings["equivariant"] else 1
    inputs = features + int(settings["state_features"])
    parts = (bool(settings[f"learned_{part}"]) for part in ("energy", "dissipation", "port"))
    layout = weight_layout(settings["hidden"], features, inputs, *parts)
    return {
        "HIDDEN": settings["hidden"],
        "PREPROCESS": bool(settings["preprocess"]),
        "LEARNED_ENERGY": bool(settings["learned_energy"]),
        "LEARNED_DISSIPATION": bool(settings["learned_dissipation"]),
        "LEARNED_PORT": bool(settings["learned_port"]),
        "NORMALIZE": bool(settings["normalize"]),
        "EQUIVARIANT": bool(settings["equivariant"]),
        "STATE_FEATURES": int(settings["state_features"]),
        "FEATURES": features,
        "INPUTS": inputs,
        **{key: layout[name] for key, name in _OFFSETS.items()},
        "BLOCK": BLOCK,
    }


_OFFSETS = {
    "E_W": "energy_W",
    "E_B": "energy_b",
    "E_WV": "energy_w",
    "D_W": "dissipation_W",
    "D_B": "dissipation_b",
    "D_WV": "dissipation_w",
    "D_C": "dissipation_c",
    "P_W": "port_W",
    "P_B": "port_b",
    "P_WV": "port_w",
    "P_C": "port_c",
}


def phnn_step(
    grad: Tensor, state: list[Tensor], weights: Tensor, scalars: Tensor, **settings
) -> tuple[Tensor, list[Tensor]]:
    """``metaopt::phnn_step`` in Triton: the update and the next state (p, and v with ``normalize``)."""
    grad, weights, scalars = grad.contiguous(), weights.contiguous(), scalars.contiguous()
    p = state[0].contiguous()
    v = state[1].contiguous() if settings["normalize"] else p
    updates, p_next = torch.empty_like(grad), torch.empty_like(p)
    v_next = torch.empty_like(v) if settings["normalize"] else p_next
    n = grad.numel()
    if n:  # no launch for no coordinates; on the tensors' GPU, not the current one
        with torch.cuda.device_of(grad):
            _phnn_step_kernel[(triton.cdiv(n, BLOCK),)](
                grad, p, v, updates, p_next, v_next, weights, scalars, n,
                settings["threshold"], settings["log_divisor"], settings["small_scale"], settings["beta"],
                settings["one_minus_beta"], **kernel_constants(settings),
            )  # fmt: skip
    return updates, [p_next, v_next] if settings["normalize"] else [p_next]


def phnn_step_(
    params: list[Tensor], grads: list[Tensor], state: list[Tensor], weights: Tensor, scalars: Tensor, **settings
) -> None:
    """``metaopt::phnn_step_`` in Triton: ``params[i] += update`` and ``state`` overwritten."""
    updates, new_state = phnn_step(torch.cat([g.reshape(-1) for g in grads]), state, weights, scalars, **settings)
    torch._foreach_add_(params, [u.view_as(p) for u, p in zip(updates.split([p.numel() for p in params]), params)])
    for old, new in zip(state, new_state):
        old.copy_(new)
    torch.autograd.graph.increment_version([*params, *state])


def phnn_step_backward(
    grad: Tensor, state: list[Tensor], weights: Tensor, scalars: Tensor, grad_update: Tensor, grad_p: Tensor, **settings
) -> tuple[Tensor, Tensor]:
    """``metaopt::phnn_step_backward`` in Triton: dL/dp and the weights' summed gradients (float64, in their
    layout), then dL/dh and dL/dA₀. For every part learned, not sign-equivariant and without state
    features, as ``csrc/phnn_step.c``'s backward; each program sums its coordinates in float32, and the
    programs' sums are added in float64."""
    learned = all(settings[f"learned_{part}"] for part in ("energy", "dissipation", "port"))
    if not learned or settings["equivariant"] or settings["state_features"]:
        raise FusedUnsupported(
            "the Triton phnn backward takes every part learned, not sign-equivariant, without state features"
        )
    constants = kernel_constants(settings)
    grad, weights, scalars = grad.contiguous(), weights.contiguous(), scalars.contiguous()
    p = state[0].contiguous()
    v = state[1].contiguous() if settings["normalize"] else p
    sums = weights.numel() + 2
    n = grad.numel()
    programs = triton.cdiv(n, BLOCK)
    grad_p_out = torch.empty_like(p)
    partial = torch.empty(programs, sums, dtype=torch.float32, device=grad.device)  # every entry is written
    if n:
        with torch.cuda.device_of(grad):
            _phnn_step_backward_kernel[(programs,)](
                grad, p, v, grad_update.contiguous(), grad_p.contiguous(), grad_p_out, weights, scalars, partial, n,
                settings["threshold"], settings["log_divisor"], settings["small_scale"], settings["beta"],
                settings["one_minus_beta"], HIDDEN=constants["HIDDEN"], PREPROCESS=constants["PREPROCESS"],
                NORMALIZE=constants["NORMALIZE"], FEATURES=constants["FEATURES"],
                **{key: constants[key] for key in _OFFSETS}, SUMS=sums, BLOCK=BLOCK,
            )  # fmt: skip
    return grad_p_out, partial.sum(0, dtype=torch.float64)
