"""The learned optimizers on a GPU: phnn's Triton step and backward (the CUDA implementations of the
metaopt ops) against the batched update on the same device. Skipped where there is no CUDA device; the
Triton kernels are also checked without one, by Triton's interpreter (test_triton_interpreter.py)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("triton")  # ships with torch's Linux wheels; absent on platforms without CUDA builds

from metaopt.optimizers import triton_phnn
from metaopt.optimizers.torch_optim import LearnedOptimizer
from metaopt.tracking.registry import PRETRAINED
from tests.test_fused_step import gradients, initial_state, meta_step, model_and_data, trained_like
from tests.test_torch_optim import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GENERAL = json.loads((PRETRAINED / "general" / "spec.json").read_text())["hyperparameters"]


@pytest.fixture
def triton_calls(monkeypatch):
    """How often each Triton function ran (the ops look them up in triton_phnn at every call)."""
    calls = {}
    for name in ("phnn_step", "phnn_step_", "phnn_step_backward"):
        original = getattr(triton_phnn, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(triton_phnn, name, counted)
    return calls


@pytest.mark.parametrize("options", [{}, {"normalize": True}, GENERAL], ids=["default", "normalize", "general"])
def test_the_triton_step_trains_a_cuda_model_as_the_batched_update_does(options, triton_calls):
    optimizer, meta_params = trained_like(options, kind="phnn")
    model, x, y = model_and_data()
    model, x, y = model.cuda(), x.cuda(), y.cuda()
    losses = {}
    for fused in (True, False):
        copy_ = copy.deepcopy(model)
        losses[fused] = train(
            copy_, LearnedOptimizer(copy_.parameters(), optimizer, meta_params, fused=fused), x, y, 20
        )
    assert triton_calls["phnn_step_"] == 20
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("options", [{}, {"normalize": True}], ids=["default", "normalize"])
def test_meta_training_through_the_triton_ops_matches_the_float64_batched_update(options, triton_calls):
    optimizer, meta_params = trained_like(options, kind="phnn")
    generator = torch.Generator().manual_seed(3)
    batch, size = 3, 30_001
    grads = gradients([batch * size])[0].reshape(batch, size)
    state = {
        k: v.reshape(batch, size, *v.shape[1:]) for k, v in initial_state(optimizer, batch * size, generator).items()
    }
    weights = (torch.randn(batch, size, generator=generator), torch.randn(state["p"].shape, generator=generator))

    def on(dtype):
        return (
            {k: v.to("cuda", dtype) for k, v in meta_params.items()},
            grads.to("cuda", dtype),
            {k: v.to("cuda", dtype) for k, v in state.items()},
            tuple(w.to("cuda", dtype) for w in weights),
        )

    fused_outputs, fused_grads = meta_step(optimizer, *on(torch.float32))
    assert triton_calls["phnn_step_backward"] == 1
    outputs, reference = meta_step(optimizer, *on(torch.float64))  # float64 runs the batched update
    for got, want in zip(fused_outputs, outputs):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    scale = max(want.abs().max().item() for want in reference)
    for name, got, want in zip(["p", *meta_params], fused_grads, reference):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6 * scale, msg=name)
