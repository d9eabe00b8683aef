"""Switching a model's LoRA adapters off for a while: the base model without a second copy in memory.

DPO's reference model under LoRA is the policy with its adapters off; the adapters' values, their
requires_grad and the optimizer's view of them are untouched.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[int]:
    """Inside the block every LoRA linear of ``model`` computes its base layer only; yields their number.

    Nesting is safe: each layer gets back the state it had on entry, also when the block raises.
    """
    from mindspeed_lora.lora.layers import _LoraParallelLinear

    layers = [m for m in model.modules() if isinstance(m, _LoraParallelLinear)]
    saved = [m.adapter_enabled for m in layers]
    for m in layers:
        m.adapter_enabled = False
    try:
        yield len(layers)
    finally:
        for m, state in zip(layers, saved):
            m.adapter_enabled = state
