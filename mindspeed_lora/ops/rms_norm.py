"""RMSNorm over the last dimension: ``y = round(x * rsqrt(mean(x^2) + eps)) * weight``, output in x's dtype.

- reference: plain torch, HF's order of operations (normalise in fp32, round to x's dtype, scale by weight);
- cuda: torch's own fused RMSNorm (``F.rms_norm``, forward and backward), which beat a Triton row kernel of
  ours on an H100 (bench/README.md); it rounds once, after the weight, so it differs from the reference by
  at most about one ulp of x's dtype;
- npu: ``torch_npu.npu_rms_norm(x, gamma, epsilon) -> (y, rstd)``, gamma in x's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mindspeed_lora.ops.dispatch import cuda_availability, npu_availability, select, torch_npu_module


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (normed.to(x.dtype) * weight).to(x.dtype)


def _rms_norm_cuda(x, weight, eps):
    return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)


def _rms_norm_npu(x, weight, eps):
    # npu_rms_norm wants gamma in x's dtype; it returns (y, rstd)
    return torch_npu_module().npu_rms_norm(x, weight.to(x.dtype), epsilon=eps)[0]


_IMPLS = {"reference": rms_norm_reference, "cuda": _rms_norm_cuda, "npu": _rms_norm_npu}
_AVAILABLE = {"cuda": cuda_availability(), "npu": npu_availability("npu_rms_norm")}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, force_impl: str | None = None):
    """RMSNorm of x [..., h] with weight [h]; same shape and dtype as x."""
    impl = select("rms_norm", force_impl, _AVAILABLE, x, weight)
    return _IMPLS[impl](x, weight, eps)
