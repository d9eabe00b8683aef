"""RMSNorm over the last dimension: ``y = round(x * rsqrt(mean(x^2) + eps)) * weight``, output in x's dtype.

- reference: plain torch, HF's order of operations (normalise in fp32, round to x's dtype, scale by weight);
- cuda: a Triton row kernel with its backward (``triton_kernels.RMSNormFunction``);
- npu: ``torch_npu.npu_rms_norm(x, gamma, epsilon) -> (y, rstd)``, gamma in x's dtype.
"""
from __future__ import annotations

import torch

from mindspeed_lora.ops.dispatch import cuda_availability, npu_availability, select, torch_npu_module

MAX_WIDTH = 65536  # the Triton kernel holds one row in registers


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (normed.to(x.dtype) * weight).to(x.dtype)


def _rms_norm_cuda(x, weight, eps):
    from mindspeed_lora.ops.triton_kernels import RMSNormFunction

    return RMSNormFunction.apply(x, weight, eps)


def _rms_norm_npu(x, weight, eps):
    # npu_rms_norm wants gamma in x's dtype; it returns (y, rstd)
    return torch_npu_module().npu_rms_norm(x, weight.to(x.dtype), epsilon=eps)[0]


_IMPLS = {"reference": rms_norm_reference, "cuda": _rms_norm_cuda, "npu": _rms_norm_npu}
_AVAILABLE = {"cuda": cuda_availability(needs_triton=True), "npu": npu_availability("npu_rms_norm")}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, force_impl: str | None = None):
    """RMSNorm of x [..., h] with weight [h]; same shape and dtype as x."""
    too_wide = f"row width {x.shape[-1]} > {MAX_WIDTH}" if x.shape[-1] > MAX_WIDTH else None
    impl = select("rms_norm", force_impl, _AVAILABLE, x, weight, unsupported={"cuda": too_wide})
    return _IMPLS[impl](x, weight, eps)
