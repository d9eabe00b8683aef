"""rms_norm, swiglu and rope: the NPU path under the fake torch_npu equals the reference, forward and backward;
the references equal independent oracles (HF's Qwen3RMSNorm, silu(a)*b, rotation of (x_i, x_{i+d/2}) pairs as
complex numbers); the dispatcher refuses forced kernels it cannot run and falls back with a logged reason.

Tolerances: fp32 1e-5 absolute; bf16 2e-2 relative to the largest magnitude of the reference (both paths round
to bf16 at different points, one bf16 ulp is 2^-8 relative).
"""
import logging
import sys

import pytest
import torch

from mindspeed_lora.ops import dispatch
from mindspeed_lora.ops.dispatch import KernelUnavailable
from mindspeed_lora.ops.rms_norm import rms_norm
from mindspeed_lora.ops.rope import apply_rotary_emb, rope_cos_sin, rope_reference
from mindspeed_lora.ops.swiglu import swiglu
from tests.fake_torch_npu import assert_matches_reference, npu_fixture  # noqa: F401 - fixture npu

DTYPES = [torch.float32, torch.bfloat16]


assert_close = assert_matches_reference


def run(fn, inputs, grad_seed=0):
    """fn(*inputs) and the grads of every input that requires grad, for a fixed random output gradient."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.dtype)
    out.backward(g)
    return out.detach(), [t.grad for t in leaves if t.requires_grad]


def compare_impls(fn, inputs, dtype, impl="npu"):
    out, grads = run(lambda *a: fn(*a, force_impl=impl), inputs)
    ref_out, ref_grads = run(lambda *a: fn(*a, force_impl="reference"), inputs)
    assert out.dtype == ref_out.dtype == dtype
    assert_close(out, ref_out, dtype)
    assert len(grads) == len(ref_grads) > 0
    for g, rg in zip(grads, ref_grads):
        assert_close(g, rg, dtype)


def randn(*shape, dtype=torch.float32, grad=True, seed=0):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return t.requires_grad_(grad)


# ------------------------------------------------------------------------------------------------ RMSNorm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 3, 64), (5, 2, 4, 16)])  # layer norm [s, b, h]; q/k norm [s, b, n, d]
def test_rms_norm_npu_matches_reference(npu, dtype, shape):
    x = randn(*shape, dtype=dtype)
    w = (1 + 0.1 * randn(shape[-1], grad=False, seed=1)).to(dtype).requires_grad_()
    compare_impls(lambda x, w, force_impl: rms_norm(x, w, 1e-6, force_impl=force_impl), [x, w], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_reference_matches_hf(dtype):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    hf = Qwen3RMSNorm(64, eps=1e-6).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(1 + 0.1 * randn(64, grad=False, seed=2))
    x = randn(6, 2, 64, dtype=dtype, grad=False)
    assert torch.equal(rms_norm(x, hf.weight, 1e-6, force_impl="reference"), hf(x))


# ------------------------------------------------------------------------------------------------- SwiGLU


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_npu_matches_reference(npu, dtype):
    compare_impls(swiglu, [randn(6, 2, 2 * 40, dtype=dtype)], dtype)


def test_swiglu_reference_is_silu_of_first_half_times_second():
    x = randn(4, 3, 10, grad=False)
    gate, up = x[..., :5], x[..., 5:]
    torch.testing.assert_close(swiglu(x, force_impl="reference"), gate * torch.sigmoid(gate) * up)


def test_swiglu_rejects_odd_width():
    with pytest.raises(ValueError, match="odd"):
        swiglu(randn(2, 7, grad=False))


# --------------------------------------------------------------------------------------------------- RoPE


def _angles(max_s, rot, seed=3):
    """megatron-style rotary angles [max_s, 1, 1, rot]: positions times inverse frequencies, halves repeated."""
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    freqs = torch.outer(torch.arange(max_s).float(), inv)
    return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]


def _complex_rotation(x, angles):
    """Oracle: (x_i, x_{i+d/2}) as x_i + i*x_{i+d/2}, multiplied by e^{i*angle_i}."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * torch.polar(
        torch.ones_like(angles[..., :half]).double(), angles[..., :half].double())
    return torch.cat((z.real, z.imag), dim=-1).float()


def test_rope_reference_is_a_rotation_of_half_pairs():
    s, b, n, d = 9, 2, 3, 16
    freqs = _angles(32, d)
    x = randn(s, b, n, d, grad=False)
    cos, sin = rope_cos_sin(freqs, s)
    torch.testing.assert_close(apply_rotary_emb(x, cos, sin, force_impl="reference"),
                               _complex_rotation(x, freqs[:s]), atol=1e-5, rtol=1e-5)


def test_rope_cos_sin_packed_positions_restart_at_each_sequence():
    freqs = _angles(16, 8)
    cu = torch.tensor([0, 3, 7, 12], dtype=torch.int32)
    cos, sin = rope_cos_sin(freqs, 12, cu)
    positions = torch.tensor([0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4])
    torch.testing.assert_close(cos, torch.cos(freqs[positions]))
    torch.testing.assert_close(sin, torch.sin(freqs[positions]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["dense", "per_batch_cos", "packed", "partial"])
def test_rope_npu_matches_reference(npu, dtype, case):
    s, b, n, d = 8, 2, 3, 32
    rot = 16 if case == "partial" else d
    freqs = _angles(20, rot)
    if case == "packed":
        x = randn(s, n, d, dtype=dtype)
        cos, sin = rope_cos_sin(freqs, s, torch.tensor([0, 5, 8]), dtype=dtype)
    elif case == "per_batch_cos":
        x = randn(s, b, n, d, dtype=dtype)
        cos, sin = (t.expand(s, b, 1, rot) for t in rope_cos_sin(freqs, s, dtype=dtype))
    else:
        x = randn(s, b, n, d, dtype=dtype)
        cos, sin = rope_cos_sin(freqs, s, dtype=dtype)
    compare_impls(lambda x, force_impl: apply_rotary_emb(x, cos, sin, force_impl=force_impl), [x], dtype)


def test_rope_partial_rotary_leaves_the_rest_of_the_head():
    x = randn(5, 1, 2, 12, grad=False)
    cos, sin = rope_cos_sin(_angles(8, 8), 5)
    y = apply_rotary_emb(x, cos, sin, force_impl="reference")
    assert torch.equal(y[..., 8:], x[..., 8:])
    torch.testing.assert_close(y[..., :8], rope_reference(x[..., :8], cos, sin))


def test_rope_rejects_tables_that_do_not_fit():
    x = randn(5, 2, 3, 8, grad=False)
    cos, sin = rope_cos_sin(_angles(8, 8), 4)
    with pytest.raises(ValueError, match="do not fit"):
        apply_rotary_emb(x, cos, sin)


# --------------------------------------------------------------------------------------------- dispatcher


def test_forced_kernel_that_cannot_run_is_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # not importable, whatever an earlier test left behind
    x = randn(4, 8, grad=False)
    with pytest.raises(KernelUnavailable, match="cuda"):
        rms_norm(x, torch.ones(8), force_impl="cuda")
    with pytest.raises(KernelUnavailable, match="torch_npu"):
        rms_norm(x, torch.ones(8), force_impl="npu")
    with pytest.raises(ValueError, match="force_impl"):
        rms_norm(x, torch.ones(8), force_impl="triton")


@pytest.mark.parametrize("device", ["npu", "cuda"])
def test_unavailable_kernel_falls_back_to_reference_with_a_logged_reason(monkeypatch, caplog, device):
    monkeypatch.setenv("MINDSPEED_LORA_DEVICE", device)
    monkeypatch.setattr(dispatch, "_LOGGED", set())  # each reason is logged once per process
    x = randn(4, 2 * 8, grad=False)
    with caplog.at_level(logging.WARNING, logger="mindspeed_lora.ops"):
        y = swiglu(x)
    assert torch.equal(y, swiglu(x, force_impl="reference"))
    assert any(f"{device} kernel unavailable" in r.getMessage() for r in caplog.records)


def test_npu_accelerator_keeps_cpu_tensors_on_the_reference(npu, monkeypatch):
    """Auto selection on an NPU accelerator never hands CPU tensors to torch_npu; forcing does."""
    monkeypatch.setenv("MINDSPEED_LORA_DEVICE", "npu")
    calls = []
    monkeypatch.setattr(npu, "npu_swiglu", lambda x, dim=-1: calls.append(x) or x[..., : x.shape[-1] // 2])
    x = randn(4, 8, grad=False)
    swiglu(x)  # CPU tensor: falls back
    assert calls == []
    swiglu(x, force_impl="npu")
    assert len(calls) == 1
