"""CUDA paths of the fused ops against the torch reference on the GPU, forward and backward (skipped without CUDA).

Every test forces ``force_impl="cuda"`` (so it cannot pass on the reference by accident) and compares with
``force_impl="reference"`` on the same CUDA tensors. Tolerances: fp32 2e-5 absolute and relative (1e-4 for
attention, whose SDPA kernels sum in another order); bf16 2e-2 relative to the reference's largest magnitude.
Shapes are a Qwen3-8B layer's, shortened in sequence.
"""
import pytest
import torch

from mindspeed_lora.ops.attention import attention
from mindspeed_lora.ops.cross_entropy import fused_linear_cross_entropy
from mindspeed_lora.ops.dispatch import KernelUnavailable
from mindspeed_lora.ops.rms_norm import rms_norm
from mindspeed_lora.ops.rope import apply_rotary_emb, rope_cos_sin
from mindspeed_lora.ops.swiglu import swiglu

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.float32, torch.bfloat16]
DEV = "cuda"


def assert_close(actual, expected, dtype, fp32_tol=2e-5):
    if dtype == torch.float32:
        torch.testing.assert_close(actual.float(), expected.float(), atol=fp32_tol, rtol=fp32_tol)
    else:
        scale = expected.float().abs().max().clamp_min(1.0)
        err = (actual.float() - expected.float()).abs().max()
        assert err <= 2e-2 * scale, f"max error {err:.3e} > {2e-2 * scale:.3e}"


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return (torch.randn(*shape, generator=g, device=DEV) * scale).to(dtype)


def compare(fn, inputs, dtype, fp32_tol=2e-5):
    """fn(*inputs, force_impl=...) for cuda and reference: outputs and the grads of every input."""
    results = []
    for impl in ("cuda", "reference"):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = fn(*leaves, force_impl=impl)
        out.backward(randn(*out.shape, dtype=out.dtype, seed=99))
        results.append((out.detach(), [t.grad for t in leaves]))
    (out, grads), (ref, ref_grads) = results
    assert out.dtype == ref.dtype
    assert_close(out, ref, dtype, fp32_tol)
    for g, rg in zip(grads, ref_grads):
        assert_close(g, rg, dtype, fp32_tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(512, 2, 4096), (256, 2, 32, 128), (100, 3, 1000)])
def test_rms_norm(dtype, shape):
    x = randn(*shape, dtype=dtype)
    w = (1 + 0.1 * randn(shape[-1], seed=1)).to(dtype)
    compare(lambda x, w, force_impl: rms_norm(x, w, 1e-6, force_impl=force_impl), [x, w], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [2 * 3072, 2 * 1000])
def test_swiglu(dtype, width):
    compare(swiglu, [randn(512, 2, width, dtype=dtype)], dtype)


def _angles(max_s, rot):
    inv = 1.0 / (1e6 ** (torch.arange(0, rot, 2, device=DEV).float() / rot))
    freqs = torch.outer(torch.arange(max_s, device=DEV).float(), inv)
    return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["dense", "key_view", "packed", "partial"])
def test_rope(dtype, case):
    s, b, n, d = 512, 2, 32, 128
    rot = 64 if case == "partial" else d
    freqs = _angles(1024, rot)
    if case == "packed":
        x = randn(s, n, d, dtype=dtype)
        cu = torch.tensor([0, 100, 356, 512], dtype=torch.int32, device=DEV)
        cos, sin = rope_cos_sin(freqs, s, cu, dtype=dtype)
    else:
        x = randn(s, b, n, d, dtype=dtype)
        cos, sin = rope_cos_sin(freqs, s, dtype=dtype)
    if case == "key_view":  # megatron's key: a strided view into the qkv projection
        fused = randn(s, b, 8, 3 * d, dtype=dtype)

        def fn(t, force_impl):
            return apply_rotary_emb(t[..., d:2 * d], cos, sin, force_impl=force_impl)

        compare(fn, [fused], dtype)
        return
    compare(lambda t, force_impl: apply_rotary_emb(t, cos, sin, force_impl=force_impl), [x], dtype)


S, B, NQ, NKV, D = 512, 2, 32, 8, 128


def qkv(*lead, dtype):
    return [randn(*lead, n, D, dtype=dtype, seed=i) for i, n in enumerate((NQ, NKV, NKV))]


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_dense_causal_gqa(dtype):
    compare(attention, qkv(S, B, dtype=dtype), dtype, fp32_tol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_explicit_mask(dtype):
    mask = torch.rand(B, 1, S, S, device=DEV, generator=torch.Generator(device=DEV).manual_seed(3)) > 0.5
    mask &= ~torch.eye(S, dtype=torch.bool, device=DEV)
    compare(lambda q, k, v, force_impl: attention(q, k, v, attention_mask=mask, force_impl=force_impl),
            qkv(S, B, dtype=dtype), dtype, fp32_tol=1e-4)


def test_attention_packed_varlen():
    cu = torch.tensor([0, 37, 300, 301, 700, 1024], dtype=torch.int32, device=DEV)
    compare(lambda q, k, v, force_impl: attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=399,
                                                  max_seqlen_kv=399, force_impl=force_impl),
            qkv(1024, dtype=torch.bfloat16), torch.bfloat16)


def test_attention_packed_equals_each_sequence_alone():
    cu = [0, 37, 300, 301, 700, 1024]
    q, k, v = qkv(1024, dtype=torch.bfloat16)
    out = attention(q, k, v, cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=DEV),
                    cu_seqlens_kv=torch.tensor(cu, dtype=torch.int32, device=DEV), force_impl="cuda")
    for a, b in zip(cu, cu[1:]):
        alone = attention(q[a:b, None], k[a:b, None], v[a:b, None], force_impl="reference")[:, 0]
        assert_close(out[a:b], alone, torch.bfloat16)


def test_attention_segment_ids():
    seg = torch.zeros(B, S, dtype=torch.long, device=DEV)
    seg[0, :200], seg[0, 200:450], seg[1, :] = 1, 2, 7
    compare(lambda q, k, v, force_impl: attention(q, k, v, segment_ids=seg, force_impl=force_impl),
            qkv(S, B, dtype=torch.bfloat16), torch.bfloat16)


def test_attention_varlen_refuses_fp32_when_forced():
    cu = torch.tensor([0, 10, 20], dtype=torch.int32, device=DEV)
    q, k, v = qkv(20, dtype=torch.float32)
    with pytest.raises(KernelUnavailable, match="fp16/bf16"):
        attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_kv=cu, force_impl="cuda")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_grad", [True, False])
def test_fused_linear_cross_entropy(dtype, weight_grad):
    s, b, h, v = 512, 2, 1024, 32000
    hidden = randn(s, b, h, dtype=dtype)
    weight = randn(v, h, dtype=dtype, seed=1, scale=0.05)
    labels = torch.randint(0, v, (b, s), device=DEV, generator=torch.Generator(device=DEV).manual_seed(2))
    labels[0, :50] = -100
    upstream = randn(b, s, seed=3)
    results = []
    for impl in ("cuda", "reference"):
        hh = hidden.clone().requires_grad_()
        ww = weight.clone().requires_grad_(weight_grad)
        loss = fused_linear_cross_entropy(hh, ww, labels, tp_group=None, chunk_size=300, force_impl=impl)
        (loss * upstream).sum().backward()
        results.append((loss.detach(), hh.grad, ww.grad))
    for a, r in zip(results[0], results[1]):
        if r is None:
            assert a is None
        else:
            assert_close(a, r, dtype, fp32_tol=1e-4)
