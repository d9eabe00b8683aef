"""attention: the reference against torch's SDPA and against per-sequence causal attention computed separately
(packed sequences, segment ids); the NPU path under the fake torch_npu against the reference, forward and
backward, for every mask kind and GQA.

Tolerances: fp32 2e-5 absolute; bf16 2e-2 relative to the largest magnitude of the reference.
"""
import pytest
import torch
import torch.nn.functional as F

from mindspeed_lora.ops.attention import attention, cu_seqlens_from_segment_ids
from tests.fake_torch_npu import assert_matches_reference, npu_fixture  # noqa: F401 - fixture npu

DTYPES = [torch.float32, torch.bfloat16]
S, B, NQ, NKV, D = 12, 2, 4, 2, 16


def assert_close(actual, expected, dtype):
    assert_matches_reference(actual, expected, dtype, fp32_tol=2e-5)


def qkv(*lead, nq=NQ, nkv=NKV, d=D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*lead, n, d, generator=g).to(dtype).requires_grad_() for n in (nq, nkv, nkv)]


def run(fn, tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


def sdpa_causal(q, k, v):
    """Oracle for one dense causal block: q [s, nq, d], k/v [s, nkv, d] -> [s, nq, d] via torch SDPA (math)."""
    rep = q.shape[1] // k.shape[1]
    qb, kb, vb = (t.repeat_interleave(r, 1).transpose(0, 1).float() for t, r in ((q, 1), (k, rep), (v, rep)))
    return F.scaled_dot_product_attention(qb, kb, vb, is_causal=True).transpose(0, 1)


def test_reference_causal_matches_sdpa():
    q, k, v = qkv(S, B)
    out = attention(q, k, v, force_impl="reference")
    for b in range(B):
        torch.testing.assert_close(out[:, b], sdpa_causal(q[:, b], k[:, b], v[:, b]), atol=2e-6, rtol=2e-6)


def test_reference_softmax_scale_and_explicit_mask():
    q, k, v = qkv(S, B, nq=NKV)
    mask = torch.rand(B, 1, S, S, generator=torch.Generator().manual_seed(1)) > 0.7
    mask[..., 0] = False  # every query sees at least one key
    out = attention(q, k, v, attention_mask=mask, softmax_scale=0.3, force_impl="reference")
    expected = F.scaled_dot_product_attention(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3),
                                              attn_mask=~mask, scale=0.3).permute(2, 0, 1, 3)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("impl", ["reference", "npu"])
def test_packed_equals_each_sequence_alone(npu, impl):
    lengths = [5, 1, 9, 3]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = qkv(sum(lengths))
    out = attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_kv=cu, force_impl=impl)
    for i in range(len(lengths)):
        rows = slice(int(cu[i]), int(cu[i + 1]))
        torch.testing.assert_close(out[rows], sdpa_causal(q[rows], k[rows], v[rows]), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("impl", ["reference", "npu"])
def test_segment_ids_equal_each_run_alone(npu, impl):
    seg = torch.tensor([[1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 0, 0],
                        [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2]])
    q, k, v = qkv(S, B)
    out = attention(q, k, v, segment_ids=seg, force_impl=impl)
    for b in range(B):
        cu, _ = cu_seqlens_from_segment_ids(seg[b:b + 1])
        for i in range(len(cu) - 1):
            rows = slice(int(cu[i]), int(cu[i + 1]))
            torch.testing.assert_close(out[rows, b], sdpa_causal(q[rows, b], k[rows, b], v[rows, b]),
                                       atol=2e-6, rtol=2e-6)


def test_cu_seqlens_from_segment_ids_never_cross_rows():
    seg = torch.tensor([[1, 1, 2], [2, 2, 2]])  # the run of 2s continues across the row boundary
    cu, longest = cu_seqlens_from_segment_ids(seg)
    assert cu.tolist() == [0, 2, 3, 6] and cu.dtype == torch.int32 and longest == 3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["causal", "mha", "mask", "packed", "segments"])
def test_npu_matches_reference_forward_and_backward(npu, dtype, case):
    kwargs = {}
    if case == "packed":
        tensors = qkv(S, dtype=dtype)
        cu = torch.tensor([0, 4, 11, 12], dtype=torch.int32)
        kwargs = dict(cu_seqlens_q=cu, cu_seqlens_kv=cu)
    else:
        tensors = qkv(S, B, nq=NKV if case == "mha" else NQ, dtype=dtype)
        if case == "mask":
            mask = torch.rand(B, 1, S, S, generator=torch.Generator().manual_seed(4)) > 0.6
            kwargs = dict(attention_mask=mask & ~torch.eye(S, dtype=torch.bool))
        elif case == "segments":
            kwargs = dict(segment_ids=torch.tensor([[1] * 5 + [2] * 7, [4] * 9 + [0] * 3]))
    out, grads = run(lambda q, k, v: attention(q, k, v, force_impl="npu", **kwargs), tensors)
    ref, ref_grads = run(lambda q, k, v: attention(q, k, v, force_impl="reference", **kwargs), tensors)
    assert out.shape == ref.shape and out.dtype == dtype
    assert_close(out, ref, dtype)
    for g, rg in zip(grads, ref_grads):
        assert_close(g, rg, dtype)


def test_npu_path_passes_the_documented_arguments(npu, monkeypatch):
    """Dense causal: SBH, sparse_mode 2, the compressed mask, the scale; packed: TND, sparse_mode 3, cumulative
    lengths without the leading 0 as host ints."""
    seen = []
    real = npu.npu_fusion_attention

    def spy(*args, **kwargs):
        seen.append((args[3], args[4], kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(npu, "npu_fusion_attention", spy)
    q, k, v = qkv(S, B)
    attention(q, k, v, softmax_scale=0.5, force_impl="npu")
    heads, layout, kw = seen[-1]
    assert (heads, layout, kw["sparse_mode"], kw["scale"]) == (NQ, "SBH", 2, 0.5)
    assert kw["atten_mask"].shape == (2048, 2048)
    qp, kp, vp = qkv(10)
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    attention(qp, kp, vp, cu_seqlens_q=cu, cu_seqlens_kv=cu, force_impl="npu")
    heads, layout, kw = seen[-1]
    assert (layout, kw["sparse_mode"], kw["actual_seq_qlen"], kw["actual_seq_kvlen"]) == ("TND", 3, [3, 10], [3, 10])


def test_fake_npu_attention_needs_a_mask_for_causality(npu):
    """The fake follows the documented rule: without atten_mask, sparse_mode has no effect (full attention) -
    so a caller that forgot the mask would not match the causal reference."""
    q, k, v = (t.detach() for t in qkv(S, B))
    full = npu.npu_fusion_attention(q.reshape(S, B, -1), k.reshape(S, B, -1), v.reshape(S, B, -1), NQ, "SBH",
                                    scale=D ** -0.5, sparse_mode=2)[0]
    assert not torch.allclose(full.view(S, B, NQ, D), attention(q, k, v, force_impl="reference"), atol=1e-3)


def test_attention_argument_errors():
    q, k, v = qkv(S, B)
    seg = torch.ones(B, S, dtype=torch.long)
    with pytest.raises(ValueError, match="at most one"):
        attention(q, k, v, segment_ids=seg, attention_mask=torch.zeros(S, S, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        attention(q, k, v, attention_mask=torch.zeros(S, S))
    with pytest.raises(ValueError, match="multiple"):
        attention(*qkv(S, B, nq=3, nkv=2))
    with pytest.raises(ValueError, match=r"\[b, s\]"):
        attention(q, k, v, segment_ids=seg.t())
