"""phnn's Triton step (the CUDA implementation of metaopt::phnn_step) checked on this CPU-only machine:
compiled for a GPU by Triton's compiler, and run by Triton's interpreter against the batched update
(TRITON_INTERPRET=1 is read when a kernel is defined, so each check runs in its own process)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")  # ships with torch's Linux wheels; absent on platforms without CUDA builds

SHAPES = 6  # triton_check.SHAPES


def run_check(mode: str, **env: str) -> str:
    check = Path(__file__).with_name("triton_check.py")
    result = subprocess.run(
        [sys.executable, str(check), mode], capture_output=True, text=True, env={**os.environ, **env}, timeout=900
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_the_triton_step_equals_the_batched_update_for_every_shipped_phnn_shape():
    assert run_check("interpret", TRITON_INTERPRET="1").count("update error") == 2 * SHAPES


def test_the_triton_step_compiles_for_a_gpu_for_every_shipped_phnn_shape():
    assert run_check("compile", TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1").count("compiled") == SHAPES
