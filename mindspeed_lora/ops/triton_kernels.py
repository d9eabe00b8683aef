"""Triton kernels behind the CUDA paths of swiglu, rope (each with its backward) and the per-chunk softmax of
the fused linear cross-entropy.

Imported only when a CUDA path runs (importing this module needs ``triton``). All are memory-bound row kernels:
one read of each input and one write of each output per pass, math in fp32, one rounding to the output dtype.
The reference ops in ``swiglu.py``, ``rope.py`` and ``cross_entropy.py`` are their specification.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def _num_warps(block: int) -> int:
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def _rows(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` as [rows, width] with unit stride along the row, copying only when no such view exists."""
    try:
        x2 = x.view(-1, width)
    except RuntimeError:
        x2 = x.reshape(-1, width)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


# ---------------------------------------------------------------------------------------------- SwiGLU


@triton.jit
def _swiglu_fwd(X, Y, stride_x, stride_y, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    a = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(X + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    # the reference rounds silu(a) to the input dtype before the product
    silu = (a * tl.sigmoid(a)).to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (silu * b).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(DY, X, DX, stride_dy, stride_x, stride_dx, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(X + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    silu = a * sig
    da = dy * b * sig * (1.0 + a * (1.0 - sig))
    db = dy * silu.to(DX.dtype.element_ty).to(tl.float32)
    tl.store(DX + row * stride_dx + cols, da.to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + row * stride_dx + n_cols + cols, db.to(DX.dtype.element_ty), mask=mask)


_SWIGLU_BLOCK = 1024


class SwiGLUFunction(torch.autograd.Function):
    """x = [a | b] on the last dim; y = silu(a) * b.

    Backward: da = dy * b * sig(a) * (1 + a * (1 - sig(a))); db = dy * silu(a).
    """

    @staticmethod
    def forward(ctx, x):
        width = x.shape[-1]
        half = width // 2
        x2 = _rows(x, width)
        rows = x2.shape[0]
        y = torch.empty((rows, half), dtype=x.dtype, device=x.device)
        block = min(_SWIGLU_BLOCK, triton.next_power_of_2(half))
        _swiglu_fwd[(rows, triton.cdiv(half, block))](x2, y, x2.stride(0), y.stride(0), half, BLOCK=block)
        ctx.save_for_backward(x2)
        ctx.shape = x.shape
        return y.view(*x.shape[:-1], half)

    @staticmethod
    def backward(ctx, dy):
        (x2,) = ctx.saved_tensors
        rows, width = x2.shape
        half = width // 2
        dy2 = _rows(dy, half)
        dx = torch.empty_like(x2, memory_format=torch.contiguous_format)
        block = min(_SWIGLU_BLOCK, triton.next_power_of_2(half))
        _swiglu_bwd[(rows, triton.cdiv(half, block))](dy2, x2, dx, dy2.stride(0), x2.stride(0), dx.stride(0), half,
                                                        BLOCK=block)
        return dx.view(ctx.shape)


# ------------------------------------------------------------------------------------------------ RoPE


@triton.jit
def _rope_kernel(X, COS, SIN, Y, stride_xr, stride_xn, stride_yr, stride_yn, stride_c, group, n_heads, half,
                 BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BACKWARD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    pos = row // group
    h = tl.arange(0, BLOCK_H)
    n = tl.arange(0, BLOCK_N)
    hmask = h < half
    mask = (n < n_heads)[:, None] & hmask[None, :]
    c1 = tl.load(COS + pos * stride_c + h, mask=hmask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(COS + pos * stride_c + half + h, mask=hmask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(SIN + pos * stride_c + h, mask=hmask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(SIN + pos * stride_c + half + h, mask=hmask, other=0.0).to(tl.float32)[None, :]
    offs = row * stride_xr + n[:, None] * stride_xn + h[None, :]
    x1 = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + offs + half, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:  # transpose of the rotation: dx = dy * cos + rotate_half^T(dy * sin)
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:  # y = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    yoffs = row * stride_yr + n[:, None] * stride_yn + h[None, :]
    tl.store(Y + yoffs, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + yoffs + half, y2.to(Y.dtype.element_ty), mask=mask)


def _rope_launch(x3: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor, group: int, backward: bool):
    rows, heads, dim = x3.shape
    y = torch.empty((rows, heads, dim), dtype=x3.dtype, device=x3.device)
    block_n = triton.next_power_of_2(heads)
    block_h = triton.next_power_of_2(dim // 2)
    _rope_kernel[(rows,)](x3, cos2, sin2, y, x3.stride(0), x3.stride(1), y.stride(0), y.stride(1), cos2.stride(0),
                          group, heads, dim // 2, BLOCK_N=block_n, BLOCK_H=block_h, BACKWARD=backward,
                          num_warps=_num_warps(block_n * block_h))
    return y


def _rope_rows(x: torch.Tensor) -> torch.Tensor:
    heads, dim = x.shape[-2:]
    try:
        x3 = x.view(-1, heads, dim)
    except RuntimeError:
        x3 = x.reshape(-1, heads, dim)
    return x3 if x3.stride(-1) == 1 else x3.contiguous()


class RopeFunction(torch.autograd.Function):
    """Rotate-half RoPE on x [s, b, n, d] with cos/sin [s, 1, 1, d] or [s, b, 1, d] in x's dtype.

    Forward y = x*cos + rotate_half(x)*sin; backward dx = dy*cos + rotate_half^T(dy*sin); no grad for cos/sin.
    """

    @staticmethod
    def forward(ctx, x, cos, sin):
        dim = x.shape[-1]
        # rows of x [s, b, n, d] are (position, batch) pairs in that order; cos has one row per position
        # (group = b rows share it) or one per pair (group = 1)
        group = x.shape[1] if cos.shape[1] == 1 else 1
        cos2 = cos.reshape(-1, dim).contiguous()
        sin2 = sin.reshape(-1, dim).contiguous()
        y = _rope_launch(_rope_rows(x), cos2, sin2, group, backward=False)
        ctx.save_for_backward(cos2, sin2)
        ctx.group = group
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        cos2, sin2 = ctx.saved_tensors
        dx = _rope_launch(_rope_rows(dy), cos2, sin2, ctx.group, backward=True)
        return dx.view(dy.shape), None, None


# ------------------------------------------------------------------------------- cross-entropy chunk


@triton.jit
def _ce_stats(LOGITS, LABEL, MAX, SUM_EXP, TARGET, stride, n_cols, BLOCK: tl.constexpr):
    """One pass over a row of logits: running max, sum of exp(logit - max), and the label's logit (0 when the
    label is not in this vocab shard, LABEL < 0)."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    m = float("-inf")
    s = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        new_m = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - new_m) + tl.sum(tl.exp(x - new_m), axis=0)
        m = new_m
    label = tl.load(LABEL + row)
    target = tl.load(base + tl.maximum(label, 0)).to(tl.float32)
    tl.store(MAX + row, m)
    tl.store(SUM_EXP + row, s)
    tl.store(TARGET + row, tl.where(label >= 0, target, 0.0))


@triton.jit
def _ce_grad(LOGITS, LSE, LABEL, SCALE, stride, n_cols, BLOCK: tl.constexpr):
    """In place: logits -> scale * (softmax(logits) - onehot(label)), softmax from the row's log-sum-exp."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    ptrs = LOGITS + row * stride + cols
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    p = tl.exp(x - tl.load(LSE + row))
    p = tl.where(cols == tl.load(LABEL + row), p - 1.0, p)
    tl.store(ptrs, (p * tl.load(SCALE + row)).to(LOGITS.dtype.element_ty), mask=mask)


_CE_BLOCK = 4096


def ce_chunk_stats(logits: torch.Tensor, label: torch.Tensor):
    """logits [c, v] (any float dtype, unit column stride), label [c] int64 (-1: not in this shard) ->
    (row max, sum of exp(logit - max), label logit), fp32 [c] each."""
    rows, cols = logits.shape
    out = [torch.empty(rows, dtype=torch.float32, device=logits.device) for _ in range(3)]
    _ce_stats[(rows,)](logits, label, *out, logits.stride(0), cols, BLOCK=min(_CE_BLOCK, triton.next_power_of_2(cols)),
                       num_warps=8)
    return tuple(out)


def ce_chunk_grad_(logits: torch.Tensor, lse: torch.Tensor, label: torch.Tensor, scale: torch.Tensor):
    """In place on logits [c, v]: scale * (softmax - onehot(label)); returns logits."""
    rows, cols = logits.shape
    block = min(_CE_BLOCK, triton.next_power_of_2(cols))
    _ce_grad[(rows, triton.cdiv(cols, block))](logits, lse, label, scale, logits.stride(0), cols, BLOCK=block,
                                               num_warps=8)
    return logits
