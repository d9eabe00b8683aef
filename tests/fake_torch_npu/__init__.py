"""Testing the NPU paths on the CPU: the fake ``torch_npu`` (``tests/fake_torch_npu/torch_npu``) put on the import
path for the length of a test (``fake_torch_npu()``, or the ``npu`` fixture), and the comparison of a kernel's
result with the reference's.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys

import pytest
import torch

FAKE_DIR = os.path.dirname(os.path.abspath(__file__))


@contextlib.contextmanager
def fake_torch_npu():
    """Import the fake as ``torch_npu``; afterwards restore ``sys.path`` and drop the module again."""
    previous = sys.modules.pop("torch_npu", None)
    sys.path.insert(0, FAKE_DIR)
    try:
        module = importlib.import_module("torch_npu")
        if not module.__file__.startswith(FAKE_DIR):
            raise RuntimeError(f"expected the fake torch_npu, imported {module.__file__}")
        yield module
    finally:
        sys.path.remove(FAKE_DIR)
        sys.modules.pop("torch_npu", None)
        if previous is not None:
            sys.modules["torch_npu"] = previous


@pytest.fixture(name="npu")
def npu_fixture():
    """Fixture ``npu``: the fake torch_npu module, importable as ``torch_npu`` during the test (a test module
    imports ``npu_fixture`` to use it)."""
    with fake_torch_npu() as module:
        yield module


BF16_REL_TOL = 2e-2


def assert_matches_reference(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                             fp32_tol: float = 1e-5) -> None:
    """fp32: within ``fp32_tol`` (absolute and relative). bf16: max error within 2e-2 of the reference's largest
    magnitude (at least 1): kernels and reference round to bf16 at different points, one bf16 ulp is 2^-8."""
    if dtype == torch.float32:
        torch.testing.assert_close(actual.float(), expected.float(), atol=fp32_tol, rtol=fp32_tol)
    else:
        scale = expected.float().abs().max().clamp_min(1.0)
        err = (actual.float() - expected.float()).abs().max()
        assert err <= BF16_REL_TOL * scale, f"max error {err:.3e} > {BF16_REL_TOL * scale:.3e}"
