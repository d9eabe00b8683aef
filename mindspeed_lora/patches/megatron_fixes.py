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


# ------------------------------------------------------------------ multi-tensor fallbacks without syncs


def _uses_local_multi_tensor_ops(acc: Accelerator) -> bool:
    """True when megatron found neither Transformer Engine nor apex and uses its per-tensor Python loops."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    return clip_grads.l2_norm_impl in (utils.local_multi_tensor_l2_norm, foreach_l2_norm)


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for megatron's ``local_multi_tensor_l2_norm``: the same norm, computed on the device.

    megatron's version builds ``torch.tensor([norm(g) for g in grads])``, one blocking device-to-host copy per
    gradient (288 for LoRA on a 36-layer model): the host waits on the device hundreds of times per step.
    """
    tensors = [t for group in tensor_lists for t in group]
    norms = torch._foreach_norm(tensors)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    return total.reshape(1), None


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for megatron's ``local_multi_tensor_scale`` (dst = src * scale): one foreach op per list."""
    srcs, dsts = tensor_lists[0], tensor_lists[1]
    if not srcs:
        return
    if all(s is d for s, d in zip(srcs, dsts)):
        torch._foreach_mul_(dsts, scale)
    elif scale == 1.0:
        torch._foreach_copy_(dsts, srcs)
    else:
        torch._foreach_copy_(dsts, torch._foreach_mul(srcs, scale))


def foreach_copy_this_to_that(this, that, overflow_buf=None):
    """Drop-in for megatron's ``_multi_tensor_copy_this_to_that``: the bf16 optimizer's main -> model param copy.

    megatron copies tensor by tensor when it has no overflow buffer (always for bf16): 288 launches a step for
    LoRA on a 36-layer model. One foreach copy (with the dtype cast) does the same.
    """
    if overflow_buf is not None:
        overflow_buf.fill_(0)
    if this:
        torch._foreach_copy_(list(that), list(this))


register(
    Patch(
        name="multi-tensor-ops-without-syncs",
        targets=(
            "megatron.core.optimizer.clip_grads:l2_norm_impl",
            "megatron.core.optimizer.clip_grads:multi_tensor_scale_impl",
            "megatron.core.optimizer.optimizer:multi_tensor_scale_impl",
            "megatron.core.optimizer.optimizer:_multi_tensor_copy_this_to_that",
        ),
        reason="without Transformer Engine or apex, megatron's fallback grad-norm reads every gradient's norm to "
        "the host (one device sync per parameter, each step) and scales and copies tensors one by one; the "
        "replacements compute the same values with torch._foreach ops and no host round trip",
        condition=_uses_local_multi_tensor_ops,
        condition_text="neither Transformer Engine nor apex is installed",
        build=lambda acc, original: {"local_multi_tensor_l2_norm": foreach_l2_norm,
                                     "_multi_tensor_copy_this_to_that": foreach_copy_this_to_that}.get(
            original.__name__, foreach_scale),
    )
)
