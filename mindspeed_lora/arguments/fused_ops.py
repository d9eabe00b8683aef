"""Fused-op flags (MindSpeed-LLM names) and the ``FusedOpsConfig`` they make.

Each flag is on/off (``--use-fused-rmsnorm`` / ``--no-use-fused-rmsnorm``); left out, it is on where the
device has the kernels (npu, cuda) and off on the CPU, where the torch reference runs either way.
"""
from __future__ import annotations

import argparse

from mindspeed_lora.ops.spec import FLAG_NAMES, FusedOpsConfig

_HELP = {
    "use_fused_rmsnorm": "fused RMSNorm (layer norms and q/k norms): npu_rms_norm on NPU, Triton on CUDA",
    "use_fused_swiglu": "fused SwiGLU in the MLP: npu_swiglu on NPU, Triton on CUDA",
    "use_fused_rotary_pos_emb": "fused rotary embedding on q and k: npu_rotary_mul on NPU, Triton on CUDA",
    "use_flash_attn": "flash attention: npu_fusion_attention on NPU, flash/cuDNN SDPA and varlen on CUDA; "
                      "needed for packed sequences",
}


def add_fused_ops_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("fused ops (default: on for npu and cuda, off for cpu)")
    for name in FLAG_NAMES:
        g.add_argument("--" + name.replace("_", "-"), dest=name, action=argparse.BooleanOptionalAction,
                       default=None, help=_HELP[name])
    g.add_argument("--use-fused-linear-cross-entropy", dest="use_fused_linear_cross_entropy",
                   action=argparse.BooleanOptionalAction, default=None,
                   help="training loss: output layer and cross-entropy fused in chunks, so the fp32 logits of "
                        "the whole sequence never exist (long sequences fit)")


def fused_linear_cross_entropy_enabled(args: argparse.Namespace, device_type: str | None = None) -> bool:
    """--use-fused-linear-cross-entropy, or where left out: on for npu and cuda, off for cpu."""
    from mindspeed_lora.accelerator import get_accelerator

    flag = getattr(args, "use_fused_linear_cross_entropy", None)
    if flag is not None:
        return flag
    return (device_type or get_accelerator().device_type) != "cpu"


def fused_ops_config(args: argparse.Namespace, device_type: str | None = None) -> FusedOpsConfig:
    """The flags of ``args``, with those left out resolved for ``device_type`` (default: this process's)."""
    return FusedOpsConfig.for_device(device_type, **{name: getattr(args, name) for name in FLAG_NAMES})
