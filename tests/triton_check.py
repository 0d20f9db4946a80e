"""Run by test_triton_interpreter.py: phnn's Triton step for every shipped phnn shape (and two more), and its
backward for every one of them that meta-trains through the ops, ``compile``d by Triton's real compiler for
an H100 (sm_90; no GPU needed), or run on CPU tensors under TRITON_INTERPRET=1 (``interpret``): the step
against the batched update, the backward against the C backward. Prints a line per check and exits 1 on a
mismatch."""

import json
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget

from metaopt.optimizers import make_optimizer
from metaopt.optimizers.triton_phnn import (
    _phnn_step_backward_kernel,
    _phnn_step_kernel,
    kernel_constants,
    phnn_step,
    phnn_step_,
    phnn_step_backward,
)
from metaopt.tracking.registry import PRETRAINED

SHAPES = {
    "general (pretrained)": json.loads((PRETRAINED / "general" / "spec.json").read_text())["hyperparameters"],
    "quadratic, MNIST sigmoid": {"init_lr": 0.01},
    "MNIST normalized": {"normalize": True},
    "MNIST equivariant, mixture": {"normalize": True, "sign_equivariant": True, "horizon": 100},
    "state features": {"state_features": True, "hidden": 5},
    "fixed parts": {"dissipation": "constant", "hamiltonian": "quadratic", "preprocess": False},
    # not shipped: the backward with one gradient feature and other widths
    "no preprocessing": {"preprocess": False, "hidden": 5},
    "normalized, no preprocessing": {"normalize": True, "preprocess": False, "hidden": 7},
}


def compile_for_gpu(kernel, constants: dict) -> None:
    """Compile ``kernel`` specialised for ``constants`` to a CUDA binary (raises on a kernel the compiler refuses)."""
    names = kernel.arg_names
    floats = ("threshold", "log_divisor", "small_scale", "beta", "one_minus_beta")
    signature = {
        name: "*fp32" if name.endswith("_ptr") else "i32" if name == "n" else "fp32" if name in floats else "constexpr"
        for name in names
    }
    constexprs = {(names.index(k),): v for k, v in constants.items() if k in names}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    assert "cubin" in triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm


def check(name: str, options: dict) -> bool:
    optimizer = make_optimizer("phnn", **options)
    generator = torch.Generator().manual_seed(0)
    meta_params = {
        k: v + 0.3 * torch.randn(v.shape, generator=generator) for k, v in optimizer.init_meta_params(0).items()
    }
    size = 1000
    grad = torch.randn(size, generator=generator) * torch.logspace(-8, 1, size)
    grad[:5] = 0.0
    state = {
        k: v.uniform_(0, 1, generator=generator) if k == "v" else v.normal_(generator=generator)
        for k, v in optimizer.init_state(torch.zeros(size)).items()
    }
    meta_trains = optimizer._fused_meta_supported()
    if sys.argv[1] == "compile":
        settings = optimizer._fused_inputs(meta_params, 0, 1.0)[2]
        compile_for_gpu(_phnn_step_kernel, kernel_constants(settings))
        print(f"{name}: compiled for sm_90")
        if meta_trains:
            sums = optimizer.fused_weights(meta_params).numel() + 2
            compile_for_gpu(_phnn_step_backward_kernel, {**kernel_constants(settings), "SUMS": sums})
            print(f"{name}: backward compiled for sm_90")
        return True
    ok = True
    if meta_trains:  # the backward of meta-training through the ops, against the C backward
        weights, scalars, settings = optimizer._fused_inputs(meta_params, 3, 1.0)
        upstream = [torch.randn(size, generator=generator) for _ in range(2)]
        got = phnn_step_backward(grad, list(state.values()), weights, scalars, *upstream, **settings)
        want = optimizer.fused_kernel.backward(grad, list(state.values()), weights, scalars, *upstream, **settings)
        errors = [float((a.reshape(b.shape) - b).abs().max() / b.abs().max()) for a, b in zip(got, want)]
        ok &= max(errors) < 1e-5
        print(f"{name}, backward: dL/dp error {errors[0]:.2e}, meta-gradient {errors[1]:.2e} (relative)")
    for step in (0, 57):
        weights, scalars, settings = optimizer._fused_inputs(meta_params, step, 1.0)
        updates, new_state = phnn_step(grad, list(state.values()), weights, scalars, **settings)
        with torch.no_grad():
            expected, expected_state = optimizer.update(meta_params, grad, state, step)
        scale = float(expected.abs().max())
        error = float((updates - expected).abs().max()) / scale
        state_error = max(float((a - b).abs().max()) for a, b in zip(new_state, expected_state.values()))
        params = [torch.zeros(300), torch.zeros(700)]
        copies = [s.clone() for s in state.values()]
        phnn_step_(params, list(grad.split([300, 700])), copies, weights, scalars, **settings)
        in_place = float((torch.cat(params) - updates).abs().max()) + max(
            float((a - b).abs().max()) for a, b in zip(copies, new_state)
        )
        ok &= error < 1e-5 and state_error < 1e-5 and in_place == 0.0
        empty, _ = phnn_step(grad[:0], [s[:0] for s in state.values()], weights, scalars, **settings)
        ok &= empty.numel() == 0
        print(f"{name}, step {step}: update error {error:.2e} (relative), state {state_error:.2e}, in place {in_place}")
    return ok


if __name__ == "__main__":
    sys.exit(0 if all([check(name, options) for name, options in SHAPES.items()]) else 1)
