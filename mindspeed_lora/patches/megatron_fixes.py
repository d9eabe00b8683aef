"""Patches for megatron-core's training machinery (optimizer, DDP, checkpoint helpers) off CUDA.

The device-redirect patch (``device.py``) covers ``torch.cuda.*`` calls and ``device="cuda"`` factories.
What remains are spots that test a tensor's *type string* (``param.type() == "torch.cuda.FloatTensor"``):
a CPU tensor answers ``"torch.FloatTensor"`` and an NPU one ``"torch.npu.FloatTensor"``, so megatron's
optimizers refuse them. Each patch below wraps one megatron function so that, while it runs, tensors
report their type under the CUDA name; the function itself is megatron's own, unchanged.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from mindspeed_lora.accelerator import Accelerator
from mindspeed_lora.patches.registry import Patch, register


def _cuda_type_name(name: str) -> str:
    """``torch.FloatTensor`` / ``torch.npu.FloatTensor`` -> ``torch.cuda.FloatTensor``."""
    if not name.startswith("torch.") or name.startswith("torch.cuda."):
        return name
    base = name.rsplit(".", 1)[-1]
    return f"torch.cuda.{base}"


@contextlib.contextmanager
def tensors_named_as_cuda():
    """While active, ``Tensor.type()`` (no arguments) answers with the CUDA type name.

    Only the no-argument form (a query) changes; ``t.type(dtype)`` conversions are untouched. The original
    method is restored on exit, so the change is confined to the wrapped megatron call.
    """
    original = torch.Tensor.type

    @functools.wraps(original)
    def type_(self, *args, **kwargs):
        if args or kwargs:
            return original(self, *args, **kwargs)
        return _cuda_type_name(original(self))

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cuda_type_names(original):
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        with tensors_named_as_cuda():
            return original(*args, **kwargs)

    return wrapper


def _not_cuda(acc: Accelerator) -> bool:
    return acc.device_type != "cuda"


register(
    Patch(
        name="optimizer-param-type-names",
        targets=(
            "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.__init__",
            "megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params.__init__",
            "megatron.core.optimizer.optimizer:clip_grad_by_total_norm_fp32",
        ),
        reason="megatron's optimizers sort params into fp32/fp16/bf16 groups by comparing Tensor.type() with "
        "'torch.cuda.*Tensor' strings and refuse anything else; while these calls run, cpu/npu tensors "
        "report the CUDA name of their dtype",
        condition=_not_cuda,
        condition_text="device is npu or cpu",
        build=lambda acc, original: _with_cuda_type_names(original),
    )
)
