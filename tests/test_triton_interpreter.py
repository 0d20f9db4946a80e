"""phnn's Triton step and backward (the CUDA implementations of metaopt::phnn_step and
metaopt::phnn_step_backward) checked on this CPU-only machine: compiled for a GPU by Triton's compiler, and
run by Triton's interpreter against the batched update and the C backward (TRITON_INTERPRET=1 is read when
a kernel is defined, so each check runs in its own process)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")  # ships with torch's Linux wheels; absent on platforms without CUDA builds

SHAPES = 8  # triton_check.SHAPES: every shipped phnn shape and two more
META_TRAINED = 4  # the shapes among them that meta-train through the ops (every part learned, not equivariant)


def run_check(mode: str, **env: str) -> str:
    check = Path(__file__).with_name("triton_check.py")
    result = subprocess.run(
        [sys.executable, str(check), mode], capture_output=True, text=True, env={**os.environ, **env}, timeout=900
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_the_triton_step_and_backward_equal_the_batched_update_and_the_c_backward_for_every_shipped_phnn_shape():
    output = run_check("interpret", TRITON_INTERPRET="1")
    assert output.count("update error") == 2 * SHAPES
    assert output.count("backward:") == META_TRAINED


def test_the_triton_step_and_backward_compile_for_a_gpu_for_every_shipped_phnn_shape():
    output = run_check("compile", TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    assert output.count("compiled") == SHAPES + META_TRAINED
