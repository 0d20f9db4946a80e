"""Native CPU kernels (``csrc/*.c``) for learned optimizers' fused steps: compiled on first use with
the system C compiler (``$CC``, else ``cc``) and cached under ``$METAOPT_CACHE_DIR`` (default
``~/.cache/metaopt``), the way ``torch.utils.cpp_extension`` caches its builds; called with ctypes."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch
from torch import Tensor

SOURCES = Path(__file__).parent / "csrc"
BUILD_TIMEOUT_S = 300
FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-fPIC", "-shared", "-pthread")


class NativeUnavailable(RuntimeError):
    """No native kernel here: no C compiler, or its build failed."""


class FusedUnsupported(ValueError):
    """The kernel does not take these inputs (device, dtype, layout or network shape): not an error of the
    kernel, a case for the batched update."""


_libraries: dict[str, ctypes.CDLL | NativeUnavailable] = {}


def cache_dir(kind: str = "native") -> Path:
    """metaopt's cache of ``kind`` (native kernels, registry pulls, benchmark baselines):
    ``$METAOPT_CACHE_DIR/KIND``, else ``$XDG_CACHE_HOME/metaopt/KIND`` or ``~/.cache/metaopt/KIND``."""
    if os.environ.get("METAOPT_CACHE_DIR"):
        return Path(os.environ["METAOPT_CACHE_DIR"]) / kind
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "metaopt" / kind


def library(name: str) -> ctypes.CDLL:
    """The compiled ``csrc/{name}.c``; raises ``NativeUnavailable`` (the same one on every later call)
    where it cannot be built."""
    if name not in _libraries:
        try:
            _libraries[name] = _load(SOURCES / f"{name}.c")
        except NativeUnavailable as error:
            _libraries[name] = error
    found = _libraries[name]
    if isinstance(found, NativeUnavailable):
        raise found
    return found


def _machine() -> str:
    """What ``-march=native`` depends on: the architecture and the CPU's feature flags."""
    try:
        flags = next(
            (line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith(("flags", "Features"))),
            "",
        )
    except OSError:
        flags = platform.processor()
    return f"{platform.machine()} {flags}"


def _load(source: Path) -> ctypes.CDLL:
    compiler_name = os.environ.get("CC") or "cc"
    compiler = shutil.which(compiler_name)
    if compiler is None:
        raise NativeUnavailable(
            f"no C compiler {compiler_name!r} on PATH to build {source.name}; install gcc or clang, or set CC"
        )
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as error:
        raise NativeUnavailable(f"the C compiler {compiler} does not run ({error})") from error
    texts = [path.read_text() for path in (source, *sorted(source.parent.glob("*.h")))]
    key = hashlib.sha256("\0".join([*texts, *FLAGS, version, _machine()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        try:
            return ctypes.CDLL(str(target))
        except OSError:  # a truncated or foreign file in the cache: build it again
            target.unlink(missing_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        build = subprocess.run(
            [compiler, *FLAGS, "-o", str(partial), str(source), "-lm"],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
        if build.returncode != 0:
            raise NativeUnavailable(f"{compiler} could not build {source.name}:\n{build.stderr.strip()}")
        os.replace(partial, target)  # atomic: concurrent processes never load a half-written library
    except (OSError, subprocess.TimeoutExpired) as error:
        raise NativeUnavailable(
            f"could not build {source.name} into {target.parent} ({error}); set METAOPT_CACHE_DIR to a writable folder"
        ) from error
    finally:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
    try:
        return ctypes.CDLL(str(target))
    except OSError as error:  # e.g. a cache on a noexec mount
        raise NativeUnavailable(
            f"built {target} but cannot load it ({error}); set METAOPT_CACHE_DIR to another folder"
        ) from error


def run_fused(
    name: str,
    params: list[Tensor],
    grads: list[Tensor],
    state: list[Tensor],
    weights: Tensor,
    options: ctypes.Structure,
) -> None:
    """Run kernel ``name`` (see ``csrc/fused_common.h``) over ``params`` in place, with ``options`` (the
    kernel's ``Options`` struct). Raises ``FusedUnsupported`` unless every tensor is contiguous float32
    on the CPU or where the kernel refuses ``options``, and ``NativeUnavailable`` where it cannot be
    built."""
    if not all(
        t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
        for t in (*params, *grads, *state, weights)
    ):
        raise FusedUnsupported(f"the fused step ({name}.c) takes contiguous float32 CPU tensors only")
    kernel = getattr(library(name), name)
    if kernel.argtypes is None:
        kernel.argtypes = [
            ctypes.c_int64,
            ctypes.POINTER(ctypes.c_int64),
            *[ctypes.POINTER(ctypes.c_void_p)] * 3,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int,
        ]
        kernel.restype = ctypes.c_int

    def pointers(tensors: list[Tensor]):
        return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))

    status = kernel(
        len(params),
        (ctypes.c_int64 * len(params))(*(p.numel() for p in params)),
        pointers(params),
        pointers(grads),
        pointers(state),
        weights.data_ptr(),
        ctypes.addressof(options),
        torch.get_num_threads(),
    )
    if status != 0:
        raise FusedUnsupported(f"the fused step ({name}.c) does not take {_named(options)}")


def run_fused_backward(
    name: str, grad: Tensor, state: list[Tensor], weights: Tensor, options: ctypes.Structure, extra: int
) -> tuple[Tensor, Tensor]:
    """Run ``{name}_backward`` over the flat ``grad``; ``state`` is (the first state, dL/dupdate,
    dL/d(next first state), then the kernel's own). Returns dL/d(the first state) and the summed
    gradients of the kernel's weights (float64, in the weights' layout, then ``extra`` more that the
    kernel documents)."""
    if not all(
        t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in (grad, *state, weights)
    ):
        raise FusedUnsupported(f"the fused backward ({name}.c) takes contiguous float32 CPU tensors only")
    kernel = getattr(library(name), f"{name}_backward")
    if kernel.argtypes is None:
        kernel.argtypes = [
            ctypes.c_int64,
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int,
        ]
        kernel.restype = ctypes.c_int
    grad_state = torch.empty_like(state[0])
    sums = torch.zeros(weights.numel() + extra, dtype=torch.float64)
    status = kernel(
        grad.numel(),
        grad.data_ptr(),
        (ctypes.c_void_p * len(state))(*(t.data_ptr() for t in state)),
        grad_state.data_ptr(),
        weights.data_ptr(),
        ctypes.addressof(options),
        sums.data_ptr(),
        torch.get_num_threads(),
    )
    if status == -2:
        raise MemoryError(f"the fused backward ({name}.c) could not allocate its buffers")
    if status != 0:
        raise FusedUnsupported(f"the fused backward ({name}.c) does not take {_named(options)}")
    return grad_state, sums


def _named(options: ctypes.Structure) -> str:
    """``options`` as ``name=value, ...``, for messages."""
    return ", ".join(f"{name}={getattr(options, name):g}" for name, _ in options._fields_)
