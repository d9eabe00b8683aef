"""Scaled dot-product attention for training: causal, packed sequences (varlen), segment ids, explicit masks.

Layouts are megatron's. Dense: q [sq, b, nq, d], k/v [sk, b, nkv, d] -> out [sq, b, nq, dv]. Packed (THD):
q [tq, nq, d], k/v [tk, nkv, d] with cumulative offsets ``cu_seqlens`` [n+1] (0, l1, l1+l2, ...) -> [tq, nq, dv].
nq must be a multiple of nkv (GQA). The mask is one of:

- none: causal (sq == sk);
- ``cu_seqlens_q`` / ``cu_seqlens_kv``: causal inside each packed sequence, none across; when a sequence's q
  and kv lengths differ the causal diagonal is aligned bottom-right (the last query sees every key);
- ``segment_ids`` [b, s] int: causal inside each run of equal ids in a row (MindSpeed's --neat-pack masks:
  1, 2, 3... and 0 for padding, which becomes a segment of its own);
- ``attention_mask`` bool, broadcastable to [b, nq, sq, sk], True = masked out (megatron's convention), used
  as given: no causal mask is added.

Implementations:

- reference: softmax(q k^T * scale + mask) v in fp32, cast to q's dtype; materialises the scores (the spec,
  what the CPU runs);
- cuda: ``torch.nn.functional.scaled_dot_product_attention`` (flash / cuDNN / memory-efficient backends) for
  dense batches; ``torch.nn.attention.varlen.varlen_attn`` (flash varlen, no mask tensor) for packed
  sequences and segment ids;
- npu: ``torch_npu.npu_fusion_attention``: dense causal in SBH layout with sparse_mode=2 (leftUpCausal) and the
  2048x2048 compressed causal mask; packed in TND layout with sparse_mode=3 (rightDownCausal per sequence),
  ``actual_seq_qlen`` / ``actual_seq_kvlen`` being the cumulative lengths without the leading 0; an explicit
  mask with sparse_mode=0.
"""
from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.nn.functional as F

from mindspeed_lora.ops.dispatch import (
    TensorMemo,
    cuda_availability,
    npu_availability,
    select,
    torch_npu_module,
)

NPU_CAUSAL_MASK_SIZE = 2048


# ------------------------------------------------------------------------------------------- masks


def _check_gqa(nq: int, nkv: int) -> None:
    if nkv == 0 or nq % nkv:
        raise ValueError(f"attention: {nq} query heads is not a multiple of {nkv} key/value heads")


def _run_ids(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] -> [b, s] index of each token's run of equal ids within its row (0, 0, 1, 1, 1, 2, ...)."""
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    return torch.cat([torch.zeros_like(segment_ids[:, :1]), change.long().cumsum(-1)], dim=-1)


def segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Bool [b, 1, s, s], True = masked: causal within each run of equal ids."""
    runs = _run_ids(segment_ids)
    s = segment_ids.shape[1]
    pos = torch.arange(s, device=segment_ids.device)
    return ((runs[:, :, None] != runs[:, None, :]) | (pos[None, None, :] > pos[None, :, None]))[:, None]


def packed_mask(cu_seqlens_q: torch.Tensor, cu_seqlens_kv: torch.Tensor, tq: int, tk: int) -> torch.Tensor:
    """Bool [tq, tk], True = masked: causal (bottom-right aligned) within each packed sequence."""
    def locate(cu, t):
        cu = cu.long()
        idx = torch.arange(t, device=cu.device)
        seq = torch.bucketize(idx, cu[1:], right=True)
        return seq, idx - cu[seq], (cu[1:] - cu[:-1])[seq]

    seq_q, pos_q, len_q = locate(cu_seqlens_q, tq)
    seq_k, pos_k, len_k = locate(cu_seqlens_kv, tk)
    later = (pos_k - len_k)[None, :] > (pos_q - len_q)[:, None]
    return (seq_q[:, None] != seq_k[None, :]) | later


def cu_seqlens_from_segment_ids(segment_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Offsets (int32 [n+1]) of the runs of equal ids over the row-major flattened [b*s] tokens, and the
    longest run. A run never crosses a row boundary."""
    b, s = segment_ids.shape
    starts = torch.ones(b, s, dtype=torch.bool, device=segment_ids.device)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.nonzero(starts.flatten(), as_tuple=True)[0]
    cu = torch.cat([first, first.new_tensor([b * s])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


# -------------------------------------------------------------------------------------------- reference


def _attend(q, k, v, mask, scale, dropout_p):
    """q [B, nq, sq, d], k/v [B, nkv, sk, d], mask bool broadcastable to [B, nq, sq, sk] or None."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v.float()).to(q.dtype)


def _reference(q, k, v, spec):
    if spec.packed:
        mask = packed_mask(spec.cu_q, spec.cu_kv, q.shape[0], k.shape[0])
        out = _attend(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], mask,
                      spec.scale, spec.dropout_p)
        return out[0].transpose(0, 1)
    if spec.segment_ids is not None:
        mask = segment_mask(spec.segment_ids)
    elif spec.attention_mask is not None:
        mask = spec.attention_mask
    else:
        sq = q.shape[0]
        mask = torch.ones(sq, sq, dtype=torch.bool, device=q.device).triu(1)
    out = _attend(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), mask, spec.scale,
                  spec.dropout_p)
    return out.permute(2, 0, 1, 3)


# ------------------------------------------------------------------------------------------------ CUDA


@functools.lru_cache(maxsize=None)
def _varlen_api():
    """(varlen_attn, its parameter names), or (None, reason) when this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as e:
        return None, f"torch.nn.attention.varlen not importable ({e})"
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _varlen_cuda(q, k, v, cu_q, cu_kv, max_q, max_kv, scale):
    fn, params = _varlen_api()
    kwargs = {}
    if "window_size" in params:  # newer torch: causal is the window (-1, 0)
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    if q.shape[1] != k.shape[1] and "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    if "scale" in params:
        kwargs["scale"] = scale
    elif not math.isclose(scale, q.shape[-1] ** -0.5):
        q = q * (scale * q.shape[-1] ** 0.5)
    return fn(q, k, v, cu_q, cu_kv, max_q, max_kv, **kwargs)


def _cuda(q, k, v, spec):
    if spec.packed:
        return _varlen_cuda(q, k, v, spec.cu_q, spec.cu_kv, spec.max_q, spec.max_kv, spec.scale)
    if spec.segment_ids is not None:
        return _dense_as_packed(q, k, v, spec, _varlen_cuda)
    qb, kb, vb = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    mask = None if spec.attention_mask is None else ~spec.attention_mask  # SDPA: True = attend
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, dropout_p=spec.dropout_p,
                                         is_causal=mask is None, scale=spec.scale,
                                         enable_gqa=q.shape[2] != k.shape[2])
    return out.permute(2, 0, 1, 3)


_SEGMENTS = TensorMemo()


def _dense_as_packed(q, k, v, spec, packed_fn):
    """Segment ids on a dense batch: flatten [s, b] to b*s packed tokens, one sequence per run of ids."""
    s, b = q.shape[:2]
    cu, longest = _SEGMENTS.get((spec.segment_ids,), None, lambda: cu_seqlens_from_segment_ids(spec.segment_ids))
    flat = [t.transpose(0, 1).reshape(b * s, *t.shape[2:]) for t in (q, k, v)]
    out = packed_fn(*flat, cu, cu, longest, longest, spec.scale)
    return out.view(b, s, *out.shape[1:]).transpose(0, 1)


def _cuda_unsupported(spec, query) -> str | None:
    if spec.packed or spec.segment_ids is not None:
        fn, reason = _varlen_api()
        if fn is None:
            return reason
        if spec.dropout_p > 0:
            return "varlen attention has no dropout"
        if query.dtype not in (torch.float16, torch.bfloat16):
            return f"varlen (flash) attention needs fp16/bf16, not {query.dtype}"
        if query.shape[-1] > 256 or query.shape[-1] % 8:
            return f"varlen (flash) attention needs head_dim <= 256 and a multiple of 8, not {query.shape[-1]}"
    return None


# ------------------------------------------------------------------------------------------------- NPU


@functools.lru_cache(maxsize=8)
def _npu_causal_mask(device: torch.device) -> torch.Tensor:
    # sparse_mode 2/3 take this compressed mask whatever the sequence length: True above the diagonal
    n = NPU_CAUSAL_MASK_SIZE
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)


_NPU_LENGTHS = TensorMemo()


def _npu_packed(q, k, v, cu_q, cu_kv, max_q, max_kv, scale, keep_prob=1.0):
    # actual_seq_qlen/kvlen are host int lists of cumulative lengths without the leading 0
    qlen, kvlen = _NPU_LENGTHS.get((cu_q, cu_kv), None, lambda: (cu_q[1:].tolist(), cu_kv[1:].tolist()))
    return torch_npu_module().npu_fusion_attention(
        q, k, v, q.shape[1], "TND", atten_mask=_npu_causal_mask(q.device), scale=scale, keep_prob=keep_prob,
        actual_seq_qlen=qlen, actual_seq_kvlen=kvlen, sparse_mode=3,
    )[0]


def _npu(q, k, v, spec):
    keep_prob = 1.0 - spec.dropout_p
    if spec.packed:
        return _npu_packed(q, k, v, spec.cu_q, spec.cu_kv, spec.max_q, spec.max_kv, spec.scale, keep_prob)
    if spec.segment_ids is not None:
        return _dense_as_packed(q, k, v, spec,
                                lambda *a: _npu_packed(*a, keep_prob=keep_prob))
    sq, b, nq, d = q.shape
    sk, _, nkv, dv = v.shape
    if spec.attention_mask is None:
        mask, sparse_mode = _npu_causal_mask(q.device), 2
    else:
        mask, sparse_mode = _npu_explicit_mask(spec.attention_mask, b, nq, sq, sk), 0
    out = torch_npu_module().npu_fusion_attention(
        q.reshape(sq, b, nq * d), k.reshape(sk, b, nkv * d), v.reshape(sk, b, nkv * dv), nq, "SBH",
        atten_mask=mask, scale=spec.scale, keep_prob=keep_prob, sparse_mode=sparse_mode,
    )[0]
    return out.view(sq, b, nq, dv)


def _npu_explicit_mask(mask, b, nq, sq, sk):
    """The mask in a shape npu_fusion_attention takes: [b|1, nq|1, sq, sk] (or [sq, sk])."""
    if mask.dim() == 2:
        return mask.expand(sq, sk)
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    return mask.expand(mask.shape[0], mask.shape[1], sq, sk)


# ---------------------------------------------------------------------------------------------- the op


class _Spec:
    __slots__ = ("packed", "cu_q", "cu_kv", "max_q", "max_kv", "segment_ids", "attention_mask", "scale",
                 "dropout_p")


_IMPLS = {"reference": _reference, "cuda": _cuda, "npu": _npu}
_AVAILABLE = {"cuda": cuda_availability(), "npu": npu_availability("npu_fusion_attention")}


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, softmax_scale: float | None = None,
              cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_kv: torch.Tensor | None = None,
              max_seqlen_q: int | None = None, max_seqlen_kv: int | None = None,
              segment_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0, force_impl: str | None = None) -> torch.Tensor:
    """Attention in megatron's layouts (see the module docstring); ``dropout_p`` applies as given (pass 0 in
    eval). ``softmax_scale`` defaults to 1/sqrt(d)."""
    spec = _Spec()
    spec.packed = cu_seqlens_q is not None or cu_seqlens_kv is not None
    masks = sum(x is not None for x in (segment_ids, attention_mask)) + spec.packed
    if masks > 1:
        raise ValueError("attention: give at most one of cu_seqlens, segment_ids, attention_mask")
    spec.scale = softmax_scale if softmax_scale is not None else query.shape[-1] ** -0.5
    spec.dropout_p = float(dropout_p)
    spec.segment_ids = segment_ids
    spec.attention_mask = attention_mask
    if spec.packed:
        if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
            raise ValueError(f"attention: packed q/k/v must be [t, n, d]; got {tuple(query.shape)}, "
                             f"{tuple(key.shape)}, {tuple(value.shape)}")
        spec.cu_q = cu_seqlens_q if cu_seqlens_q is not None else cu_seqlens_kv
        spec.cu_kv = cu_seqlens_kv if cu_seqlens_kv is not None else cu_seqlens_q
        spec.max_q = max_seqlen_q if max_seqlen_q is not None else int((spec.cu_q[1:] - spec.cu_q[:-1]).max())
        spec.max_kv = max_seqlen_kv if max_seqlen_kv is not None else int(
            (spec.cu_kv[1:] - spec.cu_kv[:-1]).max())
        _check_gqa(query.shape[1], key.shape[1])
    else:
        if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
            raise ValueError(f"attention: dense q/k/v must be [s, b, n, d]; got {tuple(query.shape)}, "
                             f"{tuple(key.shape)}, {tuple(value.shape)}")
        _check_gqa(query.shape[2], key.shape[2])
        if attention_mask is None and query.shape[0] != key.shape[0]:
            raise ValueError("attention: causal attention needs sq == sk; give an explicit attention_mask")
        if segment_ids is not None and tuple(segment_ids.shape) != (query.shape[1], query.shape[0]):
            raise ValueError(f"attention: segment_ids {tuple(segment_ids.shape)}; expected [b, s] = "
                             f"{[query.shape[1], query.shape[0]]}")
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            raise ValueError(f"attention: attention_mask must be bool (True = masked), got {attention_mask.dtype}")
    impl = select("attention", force_impl, _AVAILABLE, query, key, value,
                  unsupported={"cuda": _cuda_unsupported(spec, query)})
    return _IMPLS[impl](query, key, value, spec)
