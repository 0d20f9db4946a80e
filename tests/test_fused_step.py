"""The native fused steps of hnn_seed, phnn and lstm (metaopt/optimizers/csrc/), built for real with the
system C compiler: they compute the batched update, and where they cannot run they say why."""

from __future__ import annotations

import copy
import io
import os
import shutil
import stat
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from jobs.benchmarks.common import off_initialisation
from metaopt.meta import make_estimator
from metaopt.optimizers import make_optimizer, native
from metaopt.optimizers.native import FusedUnsupported, NativeUnavailable
from metaopt.optimizers.torch_optim import LearnedOptimizer
from metaopt.tasks import Quadratic, optimizee_seeds
from tests.test_torch_optim import train

REPO_ROOT = Path(__file__).resolve().parents[1]

CONFIGS = [  # (kind, options): the kernels' specialised paths first, then their runtime-shaped ones
    ("hnn_seed", {}),  # log/sign preprocessing (d = 2), hidden = d, ReLU
    ("hnn_seed", {"preprocess": False}),  # d = 1
    ("hnn_seed", {"hidden": 16, "depth": 2, "activation": "tanh"}),
    ("hnn_seed", {"hidden": 5, "activation": "gelu"}),
    ("hnn_seed", {"preprocess": False, "hidden": 3, "activation": "silu"}),
    ("hnn_seed", {"preprocess_p": 5.0, "out_mul": 0.3}),
    ("phnn", {}),  # everything learned, hidden 16
    ("phnn", {"normalize": True}),
    ("phnn", {"preprocess": False, "hidden": 5}),
    ("phnn", {"hamiltonian": "quadratic"}),
    ("phnn", {"dissipation": "constant", "port": "identity", "normalize": True}),
    ("phnn", {"normalize": True, "sign_equivariant": True}),
    ("phnn", {"sign_equivariant": True, "preprocess": False, "hidden": 7}),
    ("phnn", {"normalize": True, "sign_equivariant": True, "state_features": True}),
    ("phnn", {"state_features": True, "hidden": 9}),
    ("phnn", {"state_features": True, "sign_equivariant": True, "preprocess": False, "port": "identity"}),
    ("phnn", {"normalize": True, "sign_equivariant": True, "horizon": 50}),
    ("lstm", {}),  # log/sign preprocessing, 2 layers of 20
    ("lstm", {"preprocess": False, "hidden": 7, "layers": 3}),
    ("lstm", {"hidden": 5, "layers": 1, "out_mul": 0.3}),
]


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty build cache and no library loaded yet in this process."""
    monkeypatch.setenv("METAOPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_libraries", {})
    return tmp_path / "cache" / "native"


def trained_like(options: dict, seed: int = 0, kind: str = "hnn_seed"):
    """A learned optimizer with meta-parameters off the initialisation (hnn_seed's zero read-out makes
    no update, and phnn starts as plain heavy ball)."""
    optimizer = make_optimizer(kind, **options)
    return optimizer, off_initialisation(optimizer.init_meta_params(seed), seed, scale=0.3)


def initial_state(optimizer, size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random state of the optimizer's shape (v, a running mean of g², non-negative)."""
    return {
        key: value.uniform_(0, 1, generator=generator) if key == "v" else value.normal_(generator=generator)
        for key, value in optimizer.init_state(torch.zeros(size)).items()
    }


def gradients(sizes: list[int]) -> list[torch.Tensor]:
    """Magnitudes over 9 decades, both sides of the preprocessing threshold e^-p, and exact zeros."""
    generator = torch.Generator().manual_seed(1)
    grads = []
    for size in sizes:
        magnitude = torch.logspace(-8, 1, size)[torch.randperm(size, generator=generator)]
        grads.append(torch.randn(size, generator=generator) * magnitude)
    grads[0][:5] = 0.0
    return grads


@pytest.mark.parametrize(("kind", "options"), CONFIGS)
def test_fused_step_computes_the_batched_update(kind, options):
    optimizer, meta_params = trained_like(options, kind=kind)
    sizes = [1000, 7, 300, 70_000]  # odd sizes; over 65,536 coordinates, so two threads share the work
    generator = torch.Generator().manual_seed(2)
    params = [torch.randn(size, generator=generator) for size in sizes]
    grads = gradients(sizes)
    state = initial_state(optimizer, sum(sizes), generator)

    step = 3  # phnn's normalize corrects its running mean by 1 - β^(step + 1)
    updates, expected_state = optimizer.update(meta_params, torch.cat(grads), state, step)
    expected = [p + 0.7 * u for p, u in zip(params, updates.split(sizes))]
    fused_params, fused_state = [p.clone() for p in params], {k: v.clone() for k, v in state.items()}
    optimizer.fused_step(meta_params, fused_params, grads, fused_state, step, 0.7)

    assert updates.abs().max() > 0.01  # a real update, not the zero read-out
    for got, want in zip(fused_params, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert fused_state.keys() == expected_state.keys()
    for key in fused_state:
        torch.testing.assert_close(fused_state[key], expected_state[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["hnn_seed", "phnn", "lstm"])
def test_fused_step_is_the_same_on_one_thread_and_two(kind):
    optimizer, meta_params = trained_like({}, kind=kind)
    grads = gradients([200_000])
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            params, state = [torch.zeros(200_000)], optimizer.init_state(torch.zeros(200_000))
            optimizer.fused_step(meta_params, params, grads, state, 0, 1.0)
            results.append([params[0], *state.values()])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(one, two) for one, two in zip(*results))


def model_and_data(seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), nn.Linear(16, 3)).to(dtype)
    return model, torch.randn(64, 8, dtype=dtype), torch.randint(0, 3, (64,))


@pytest.mark.parametrize("kind", ["hnn_seed", "phnn", "lstm"])
def test_learned_optimizer_fused_and_batched_train_a_model_alike(kind):
    optimizer, meta_params = trained_like({}, kind=kind)
    model, x, y = model_and_data()
    batched_model = copy.deepcopy(model)
    fused = LearnedOptimizer(model.parameters(), optimizer, meta_params, fused=True)
    fused_losses = train(model, fused, x, y, steps=10)
    batched = LearnedOptimizer(batched_model.parameters(), optimizer, meta_params, fused=False)
    batched_losses = train(batched_model, batched, x, y, steps=10)
    torch.testing.assert_close(fused_losses, batched_losses, rtol=1e-4, atol=1e-5)
    for p, q in zip(model.parameters(), batched_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    for p, q in zip(model.parameters(), batched_model.parameters()):
        for key in optimizer.init_state(p):
            torch.testing.assert_close(fused.state[p][key], batched.state[q][key], rtol=1e-4, atol=1e-4)
    assert fused_losses[-1] != fused_losses[0]


def test_fused_state_dict_round_trip_resumes_exactly():
    optimizer, meta_params = trained_like({})
    model, x, y = model_and_data()
    straight = copy.deepcopy(model)
    first = LearnedOptimizer(model.parameters(), optimizer, meta_params)
    train(model, first, x, y, steps=5)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model, _, _ = model_and_data(seed=1)
    resumed_model.load_state_dict(saved["model"])
    resumed = LearnedOptimizer(resumed_model.parameters(), optimizer, meta_params)
    resumed.load_state_dict(saved["optimizer"])
    resumed_losses = train(resumed_model, resumed, x, y, steps=5)
    straight_losses = train(straight, LearnedOptimizer(straight.parameters(), optimizer, meta_params), x, y, 10)
    assert resumed_losses == straight_losses[5:]


def test_without_a_compiler_the_default_warns_once_and_runs_batched(fresh_cache, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler")
    optimizer, meta_params = trained_like({})
    model, x, y = model_and_data()
    reference = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="no C compiler 'no-such-compiler'") as caught:
        losses = train(model, LearnedOptimizer(model.parameters(), optimizer, meta_params), x, y, steps=3)
    assert len([w for w in caught if "fused" in str(w.message)]) == 1
    assert losses == train(
        reference, LearnedOptimizer(reference.parameters(), optimizer, meta_params, fused=False), x, y, steps=3
    )
    with pytest.raises(RuntimeError, match="fused=True, but the fused hnn_seed step cannot run: no C compiler"):
        train(model, LearnedOptimizer(model.parameters(), optimizer, meta_params, fused=True), x, y, steps=1)


def test_a_failing_build_reports_the_compiler_output(fresh_cache, tmp_path, monkeypatch):
    compiler = tmp_path / "broken-cc"
    compiler.write_text("#!/bin/sh\n[ \"$1\" = --version ] && exit 0\necho 'fatal: out of disk' >&2\nexit 1\n")
    compiler.chmod(compiler.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(compiler))
    with pytest.raises(NativeUnavailable, match="could not build hnn_seed_step.c:\nfatal: out of disk"):
        native.library("hnn_seed_step")
    with pytest.raises(NativeUnavailable, match="out of disk"):  # remembered, not rebuilt on every step
        native.library("hnn_seed_step")
    assert not list(fresh_cache.glob("*"))  # nothing half-written left in the cache


def test_an_unwritable_cache_is_named_in_the_error(fresh_cache, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("METAOPT_CACHE_DIR", str(blocker / "cache"))
    with pytest.raises(NativeUnavailable, match="a-file/cache/native .*set METAOPT_CACHE_DIR to a writable folder"):
        native.library("phnn_step")


def test_a_corrupt_cached_library_is_rebuilt(fresh_cache):
    native.library("hnn_seed_step")
    (built,) = fresh_cache.glob("hnn_seed_step-*.so")
    built.unlink()  # a new file, not an in-place write: this process still maps the library it loaded
    built.write_bytes(b"not a shared library")
    # A fresh process (this one would reuse its loaded copy): it must rebuild, then step.
    script = (
        "import torch; from tests.test_fused_step import gradients, trained_like\n"
        "optimizer, meta_params = trained_like({}); params = [torch.zeros(100)]\n"
        "optimizer.fused_step(meta_params, params, gradients([100]), {'p': torch.zeros(100, 2)}, 0, 1.0)\n"
        "print(float(params[0].abs().max()))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "METAOPT_CACHE_DIR": str(fresh_cache.parent)},
    )
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) > 0 and built.read_bytes().startswith(b"\x7fELF")


def test_the_wheel_ships_every_kernel_source(tmp_path):
    """A non-editable install builds the kernels from the wheel's copy of csrc/, headers included."""
    source = tmp_path / "source"
    for name in ("pyproject.toml", "README.md"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes((REPO_ROOT / name).read_bytes())
    shutil.copytree(REPO_ROOT / "metaopt", source / "metaopt", ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))",
            str(tmp_path / "dist"),
        ],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = tmp_path / "dist" / build.stdout.strip().splitlines()[-1]
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if "/csrc/" in name}
    kernel_sources = {
        f"metaopt/optimizers/csrc/{path.name}" for path in (REPO_ROOT / "metaopt/optimizers/csrc").iterdir()
    }
    assert kernel_sources and shipped == kernel_sources


def test_float64_is_refused_by_fused_true_and_runs_batched_by_default():
    optimizer, meta_params = trained_like({})
    model, x, y = model_and_data(dtype=torch.float64)
    with pytest.raises(RuntimeError, match="contiguous float32 CPU tensors only"):
        train(model, LearnedOptimizer(model.parameters(), optimizer, meta_params, fused=True), x, y, steps=1)
    reference = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default takes what the kernel does not without a word, like Adam's
        losses = train(model, LearnedOptimizer(model.parameters(), optimizer, meta_params), x, y, steps=2)
    assert losses == train(
        reference, LearnedOptimizer(reference.parameters(), optimizer, meta_params, fused=False), x, y, steps=2
    )
    assert losses[1] != losses[0]


def test_networks_wider_than_the_kernel_takes_are_refused():
    optimizer, meta_params = trained_like({"hidden": 65})
    with pytest.raises(FusedUnsupported, match="hidden <= 64, got 65"):
        optimizer.fused_step(meta_params, [torch.zeros(4)], [torch.ones(4)], {"p": torch.zeros(4, 2)}, 0, 1.0)


def test_phnn_options_the_kernel_does_not_take_are_refused_and_run_batched():
    optimizer, meta_params = trained_like({"state_dim": 2, "integrator": "leapfrog"}, kind="phnn")
    model, x, y = model_and_data()
    with pytest.raises(RuntimeError, match="does not take state_dim != 1, leapfrog"):
        train(model, LearnedOptimizer(model.parameters(), optimizer, meta_params, fused=True), x, y, steps=1)
    reference = copy.deepcopy(model)
    losses = train(model, LearnedOptimizer(model.parameters(), optimizer, meta_params), x, y, steps=2)
    assert losses == train(
        reference, LearnedOptimizer(reference.parameters(), optimizer, meta_params, fused=False), x, y, steps=2
    )


def test_fused_true_is_refused_where_there_is_no_fused_step():
    mlp = make_optimizer("mlp")
    model, _, _ = model_and_data()
    with pytest.raises(ValueError, match="optimizer 'mlp' has no fused step"):
        LearnedOptimizer(model.parameters(), mlp, mlp.init_meta_params(0), fused=True)
    hnn_seed, meta_params = trained_like({})
    with pytest.raises(ValueError, match="exclude each other"):
        LearnedOptimizer(model.parameters(), hnn_seed, meta_params, fused=True, compile=True)


def meta_step(optimizer, meta_params: dict, grads: torch.Tensor, state: dict, weights: tuple) -> tuple:
    """One update under meta-training: the outputs, and the gradients of a fixed linear loss of them
    w.r.t. the first state (p, or lstm's hc) and every meta-parameter."""
    meta_params = {k: v.detach().clone().requires_grad_(True) for k, v in meta_params.items()}
    key = next(iter(state))
    p = state[key].detach().clone().requires_grad_(True)
    updates, new_state = optimizer.update(meta_params, grads, {**state, key: p}, 2)
    loss = (updates * weights[0]).sum() + (new_state[key] * weights[1]).sum()
    return (updates, *new_state.values()), torch.autograd.grad(loss, [p, *meta_params.values()])


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("phnn", {}),
        ("phnn", {"normalize": True}),
        ("phnn", {"preprocess": False, "hidden": 5}),
        ("hnn_seed", {}),
        ("hnn_seed", {"preprocess": False}),
        ("hnn_seed", {"hidden": 7, "activation": "tanh"}),
        ("lstm", {}),
        ("lstm", {"preprocess": False, "hidden": 7, "layers": 3}),
    ],
)
def test_meta_training_step_and_its_backward_match_the_batched_update(kind, options):
    optimizer, meta_params = trained_like(options, kind=kind)
    generator = torch.Generator().manual_seed(3)
    batch, size = 3, 30_001  # two threads, and a last partial block of lanes
    grads = gradients([batch * size])[0].reshape(batch, size)
    flat_state = initial_state(optimizer, batch * size, generator)
    state = {k: v.reshape(batch, size, *v.shape[1:]) for k, v in flat_state.items()}
    first_state = next(iter(state.values()))
    weights = (torch.randn(batch, size, generator=generator), torch.randn(first_state.shape, generator=generator))
    fused_outputs, fused_grads = meta_step(optimizer, meta_params, grads, state, weights)
    # float64 takes the batched update: the reference, computed more exactly
    double = {k: v.double() for k, v in meta_params.items()}
    outputs, reference = meta_step(
        optimizer, double, grads.double(), {k: v.double() for k, v in state.items()}, tuple(w.double() for w in weights)
    )
    for got, want in zip(fused_outputs, outputs):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    # Sums over 90,003 coordinates cancel (hnn_seed's G.0.weight: 0.07 from terms up to ~30), so the
    # absolute tolerance is relative to the largest meta-gradient; the batched float32 update itself
    # misses float64 by up to 6e-6 of it (the kernel: 3e-7).
    scale = max(want.abs().max().item() for want in reference)
    for name, got, want in zip(["first state", *meta_params], fused_grads, reference):
        assert want.abs().max() > 0, name
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6 * scale, msg=name)


def test_a_gradient_of_the_fused_meta_gradient_is_refused_not_dropped():
    """The backward kernel has no gradient of its own: differentiating a fused meta-gradient again
    (create_graph=True) raises instead of silently leaving out the step's share."""
    optimizer, meta_params = trained_like({}, kind="phnn")
    meta_params = {k: v.clone().requires_grad_(True) for k, v in meta_params.items()}
    updates, _ = optimizer.update(meta_params, gradients([100])[0], optimizer.init_state(torch.zeros(100)), 0)
    meta_grads = torch.autograd.grad(updates.square().sum(), list(meta_params.values()), create_graph=True)
    with pytest.raises(RuntimeError, match="first order.*second_order: true"):
        torch.autograd.grad(sum(g.square().sum() for g in meta_grads), list(meta_params.values()))


def test_phnn_meta_training_without_a_compiler_warns_and_runs_batched(fresh_cache, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler")
    optimizer, meta_params = trained_like({}, kind="phnn")
    generator = torch.Generator().manual_seed(4)
    grads, state = torch.randn(2, 50, generator=generator), initial_state(optimizer, 100, generator)
    state = {k: v.reshape(2, 50, *v.shape[1:]) for k, v in state.items()}
    weights = (torch.randn(2, 50, generator=generator), torch.randn(2, 50, 1, generator=generator))
    with pytest.warns(UserWarning, match="runs the batched update: the fused kernel cannot be built"):
        outputs, grads_of = meta_step(optimizer, meta_params, grads, state, weights)
    double = {k: v.double() for k, v in meta_params.items()}
    _, reference = meta_step(
        optimizer, double, grads.double(), {k: v.double() for k, v in state.items()}, tuple(w.double() for w in weights)
    )
    for got, want in zip(grads_of, reference):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.fixture
def kernel_calls(monkeypatch):
    """The native forward kernel's completed runs (a spy around the real kernel)."""
    calls = []
    real = native.run_fused

    def counting(*args, **kwargs):
        real(*args, **kwargs)
        calls.append(args[0])

    monkeypatch.setattr("metaopt.optimizers.ops.run_fused", counting)
    return calls


@pytest.mark.parametrize(
    ("kind", "options"), [("hnn_seed", {}), ("phnn", {"normalize": True, "sign_equivariant": True}), ("lstm", {})]
)
def test_no_grad_and_per_particle_updates_run_the_kernel_and_match_the_batched_update(kind, options, kernel_calls):
    optimizer, _ = trained_like(options, kind=kind)
    particles = [off_initialisation(optimizer.init_meta_params(0), seed, scale=0.3) for seed in range(3)]
    stacked = {k: torch.stack([p[k] for p in particles]) for k in particles[0]}
    generator = torch.Generator().manual_seed(5)
    grads = gradients([3 * 4 * 500])[0].reshape(3, 4, 500)
    state = {k: v.reshape(3, 4, 500, *v.shape[1:]) for k, v in initial_state(optimizer, 6000, generator).items()}
    with torch.no_grad():
        want = torch.func.vmap(optimizer.update, in_dims=(0, 0, 0, None))(stacked, grads, state, 3)
        assert kernel_calls == []
        got = optimizer.update_particles(stacked, grads, state, 3)
        assert len(kernel_calls) == 3
        single = optimizer.update_no_grad(particles[1], grads[1], {k: v[1] for k, v in state.items()}, 3)
    for fused, batched in [(got[0], want[0]), (single[0], want[0][1])] + [(got[1][k], want[1][k]) for k in state]:
        torch.testing.assert_close(fused, batched, rtol=1e-5, atol=1e-5 * batched.abs().max().item())
    for key in state:
        torch.testing.assert_close(single[1][key], want[1][key][1], rtol=1e-5, atol=1e-5)


def test_no_grad_update_runs_batched_where_the_kernel_does_not_take_the_tensors(kernel_calls):
    optimizer, meta_params = trained_like({}, kind="phnn")
    grads = torch.randn(2, 30, dtype=torch.float64)
    state = {k: v.double() for k, v in optimizer.init_state(grads).items()}
    meta_params = {k: v.double() for k, v in meta_params.items()}
    with torch.no_grad():
        got = optimizer.update_no_grad(meta_params, grads, state, 0)
        want = optimizer.update(meta_params, grads, state, 0)
    assert kernel_calls == []
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_es_meta_gradient_with_the_kernel_matches_the_vmapped_update(kernel_calls, monkeypatch):
    """PES on the quadratic through the fused per-particle updates, against the same estimate with the
    kernel off (the class attribute patched for the second run)."""
    optimizer, meta_params = trained_like({"normalize": True, "sign_equivariant": True}, kind="phnn")
    config = SimpleNamespace(kind="pes", pairs=3, sigma=0.01)

    def estimates():
        estimator = make_estimator(
            config,
            Quadratic(dim=10),
            optimizer,
            unroll_length=5,
            episode_length=20,
            seeds=lambda episode: optimizee_seeds(0, 4, "meta_train", stream=episode),
        )
        return [estimator.estimate(meta_params).grads for _ in range(2)]

    fused = estimates()
    assert len(kernel_calls) == 2 * 5 * 6  # estimates × steps × particles
    monkeypatch.setattr(type(optimizer), "fused_kernel", None)
    batched = estimates()
    assert len(kernel_calls) == 2 * 5 * 6
    for got, want in zip(fused, batched):
        for name in want:
            torch.testing.assert_close(
                got[name], want[name], rtol=1e-3, atol=1e-3 * want[name].abs().max().item(), msg=name
            )


def test_particles_of_options_the_kernel_refuses_are_vmapped(kernel_calls):
    optimizer, meta_params = trained_like({"integrator": "leapfrog"}, kind="phnn")
    stacked = {k: torch.stack([v, 2 * v]) for k, v in meta_params.items()}
    grads = torch.randn(2, 3, 40)
    state = {k: torch.randn(2, *v.shape) for k, v in optimizer.init_state(grads[0]).items()}
    with torch.no_grad():
        got = optimizer.update_particles(stacked, grads, state, 2)
        want = torch.func.vmap(optimizer.update, in_dims=(0, 0, 0, None))(stacked, grads, state, 2)
    assert kernel_calls == []
    torch.testing.assert_close(got, want, rtol=0, atol=0)


OPS_CONFIGS = [("hnn_seed", {}), ("lstm", {}), ("phnn", {"normalize": True}), ("phnn", {"horizon": 50})]


@pytest.mark.parametrize(("kind", "options"), OPS_CONFIGS)
def test_the_kernel_ops_pass_opcheck(kind, options):
    """Schemas, fake implementations, the registered autograd and AOT tracing of metaopt::K, K_ and
    K_backward, on the shipped kernels (torch.library.opcheck)."""
    optimizer, meta_params = trained_like(options, kind=kind)
    meta_params = {k: v.requires_grad_(True) for k, v in meta_params.items()}
    generator = torch.Generator().manual_seed(0)
    (grad,) = gradients([300])
    state = initial_state(optimizer, 300, generator)
    weights, scalars, settings = optimizer._fused_inputs(meta_params, 3, 1.0)
    weights, scalars = weights.detach().requires_grad_(True), scalars.detach().requires_grad_(True)
    states = [state[key].requires_grad_(i == 0) for i, key in enumerate(state)]
    ops = optimizer.fused_kernel
    torch.library.opcheck(ops.step, (grad, states, weights, scalars), settings)
    updates, _ = ops.step(grad, states, weights, scalars, **settings)
    backward_args = (
        grad,
        [s.detach() for s in states],
        weights.detach(),
        scalars.detach(),
        torch.randn(300),  # dL/dupdate
        torch.randn_like(states[0]),  # dL/d(next first state)
    )
    torch.library.opcheck(ops.backward, backward_args, settings)
    params = [torch.randn(100), torch.randn(200)]
    torch.library.opcheck(
        ops.step_,
        (
            params,
            list(grad.split([100, 200])),
            [s.detach().clone() for s in states],
            weights.detach(),
            scalars.detach(),
        ),
        settings,
    )
    # The in-place op adds exactly the functional op's update (here to parameters of zero).
    params = [torch.zeros(100), torch.zeros(200)]
    ops.step_(
        params,
        list(grad.split([100, 200])),
        [s.detach().clone() for s in states],
        weights.detach(),
        scalars.detach(),
        **settings,
    )
    torch.testing.assert_close(torch.cat(params), updates.detach(), rtol=0, atol=0)


@pytest.mark.parametrize(("kind", "options"), OPS_CONFIGS)
def test_torch_compile_traces_the_fused_update_without_a_graph_break(kind, options):
    optimizer, meta_params = trained_like(options, kind=kind)
    (grad,) = gradients([256])
    state = initial_state(optimizer, 256, torch.Generator().manual_seed(2))

    def step(grad, state):
        return optimizer.update_no_grad(meta_params, grad, state, 3)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(grad, state), step(grad, state)):
        torch.testing.assert_close(got, want)
