"""SwiGLU on a gated projection: x = [gate | up] on the last dim, ``y = silu(gate) * up``.

This is megatron's gated-linear-unit layout for ``linear_fc1`` (each TP rank holds [gate_i; up_i]), so the
op takes fc1's output as is.

- reference: ``silu(gate) * up`` in x's dtype (megatron's ``glu``);
- cuda: a Triton kernel reading both halves in one pass, with its backward (``triton_kernels.SwiGLUFunction``);
- npu: ``torch_npu.npu_swiglu(x, dim=-1)``: splits ``dim`` in halves A, B and returns swish(A) * B; wants a
  contiguous input.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mindspeed_lora.ops.dispatch import cuda_availability, npu_availability, select, torch_npu_module


def swiglu_reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = torch.chunk(x, 2, dim=-1)
    return F.silu(gate) * up


def _swiglu_cuda(x):
    from mindspeed_lora.ops.triton_kernels import SwiGLUFunction

    return SwiGLUFunction.apply(x)


def _swiglu_npu(x):
    return torch_npu_module().npu_swiglu(x.contiguous(), dim=-1)


_IMPLS = {"reference": swiglu_reference, "cuda": _swiglu_cuda, "npu": _swiglu_npu}
_AVAILABLE = {"cuda": cuda_availability(needs_triton=True), "npu": npu_availability("npu_swiglu")}


def swiglu(x: torch.Tensor, *, force_impl: str | None = None) -> torch.Tensor:
    """x [..., 2f] -> [..., f]."""
    if x.shape[-1] % 2:
        raise ValueError(f"swiglu: last dim {x.shape[-1]} is odd; expected [gate | up] halves")
    impl = select("swiglu", force_impl, _AVAILABLE, x)
    return _IMPLS[impl](x)
