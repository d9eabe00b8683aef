"""Rotary position embedding, rotate-half form: ``y = x * cos + rotate_half(x) * sin``.

``rotate_half([x1, x2]) = [-x2, x1]`` on the first ``r`` dims of each head (``r = cos.shape[-1]``; the rest of
the head passes through). cos and sin are cast to x's dtype before use, as megatron does.

- reference: plain torch (megatron's ``_apply_rotary_pos_emb_bshd``);
- cuda: a Triton kernel over [tokens, heads, head_dim] rows with its backward (``triton_kernels.RopeFunction``);
- npu: ``torch_npu.npu_rotary_mul(x, r1, r2)`` (default ``rotary_mode='half'``), x in SBND layout with r1/r2
  laid out S11D or SB1D; needs D even and < 896, B and N < 1000.

``rope_cos_sin`` turns megatron's rotary angles ([max_s, 1, 1, r], ``RotaryEmbedding``'s output) into the
cos/sin tables for a dense batch or for packed sequences, whose positions restart at each sequence start.
"""
from __future__ import annotations

import torch

from mindspeed_lora.ops.dispatch import (
    TensorMemo,
    cuda_availability,
    npu_availability,
    select,
    torch_npu_module,
)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def _rope_cuda(x, cos, sin):
    from mindspeed_lora.ops.triton_kernels import RopeFunction

    return RopeFunction.apply(x, cos, sin)


def _rope_npu(x, cos, sin):
    return torch_npu_module().npu_rotary_mul(x, cos, sin)


_IMPLS = {"reference": rope_reference, "cuda": _rope_cuda, "npu": _rope_npu}
_AVAILABLE = {"cuda": cuda_availability(needs_triton=True), "npu": npu_availability("npu_rotary_mul")}


def _npu_unsupported(x: torch.Tensor) -> str | None:
    s, b, n, d = x.shape
    if d % 2 or d >= 896:
        return f"head dim {d} must be even and < 896"
    if b >= 1000 or n >= 1000:
        return f"batch {b} and heads {n} must be < 1000"
    return None


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                     force_impl: str | None = None) -> torch.Tensor:
    """RoPE on x [s, b, n, d] (or packed [t, n, d]) with cos/sin [s, 1, 1, r] or [s, b, 1, r] ([t, 1, 1, r])."""
    packed = x.dim() == 3
    if packed:
        x = x.unsqueeze(1)
    if x.dim() != 4 or cos.dim() != 4 or cos.shape != sin.shape:
        raise ValueError(f"rope: x {tuple(x.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}; expected "
                         "x [s, b, n, d] or [t, n, d] and cos/sin [s, 1|b, 1, r]")
    s, b, _, d = x.shape
    rot = cos.shape[-1]
    if cos.shape[0] != s or cos.shape[1] not in (1, b) or cos.shape[2] != 1 or rot > d or rot % 2:
        raise ValueError(f"rope: cos/sin {tuple(cos.shape)} do not fit x {tuple(x.shape)}")
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    x_rot, x_pass = (x, None) if rot == d else (x[..., :rot], x[..., rot:])
    impl = select("rope", force_impl, _AVAILABLE, x, unsupported={"npu": _npu_unsupported(x_rot)})
    y = _IMPLS[impl](x_rot, cos, sin)
    if x_pass is not None:
        y = torch.cat((y, x_pass), dim=-1)
    return y.squeeze(1) if packed else y


_TABLES = TensorMemo()


def rope_cos_sin(freqs: torch.Tensor, num_tokens: int, cu_seqlens: torch.Tensor | None = None, *,
                 dtype: torch.dtype = torch.float32, mscale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [num_tokens, 1, 1, r] from rotary angles ``freqs`` [max_s, 1, 1, r].

    Dense: token i of the sequence gets position i. Packed (``cu_seqlens`` [n+1], cumulative, starting at 0):
    token i gets ``i - cu_seqlens[sequence of i]``. Memoised for the last (freqs, cu_seqlens) pair, which every
    layer of one forward shares.
    """

    def compute():
        if cu_seqlens is None:
            angles = freqs[:num_tokens]
        else:
            cu = cu_seqlens.to(device=freqs.device, dtype=torch.long)
            starts = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1], output_size=num_tokens)
            angles = freqs[torch.arange(num_tokens, device=freqs.device) - starts]
        with torch.no_grad():
            return (torch.cos(angles) * mscale).to(dtype), (torch.sin(angles) * mscale).to(dtype)

    return _TABLES.get((freqs, cu_seqlens), (num_tokens, dtype, mscale, freqs.device), compute)
