"""Fused ops, one file each: a plain-torch reference (the spec, run on the CPU), a CUDA and an NPU kernel.

``dispatch.select`` picks the accelerator's kernel (``force_impl`` overrides; an unavailable kernel falls back
to the reference with a logged reason). ``spec.fused_ops_spec_hook`` brings them into megatron's layer spec.
Importing this package imports neither megatron nor triton.
"""
from mindspeed_lora.ops.attention import attention, cu_seqlens_from_segment_ids
from mindspeed_lora.ops.cross_entropy import fused_linear_cross_entropy
from mindspeed_lora.ops.dispatch import KernelUnavailable
from mindspeed_lora.ops.rms_norm import rms_norm
from mindspeed_lora.ops.rope import apply_rotary_emb, rope_cos_sin
from mindspeed_lora.ops.spec import FusedOpsConfig, fused_ops_spec_hook
from mindspeed_lora.ops.swiglu import swiglu

__all__ = [
    "FusedOpsConfig",
    "KernelUnavailable",
    "apply_rotary_emb",
    "attention",
    "cu_seqlens_from_segment_ids",
    "fused_linear_cross_entropy",
    "fused_ops_spec_hook",
    "rms_norm",
    "rope_cos_sin",
    "swiglu",
]
