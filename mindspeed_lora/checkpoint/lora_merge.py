"""Merge a LoRA adapter into base weights: W + scaling * B @ A, computed in fp32 and cast once.

Merging happens on HF tensors: a fused megatron linear's rows are a permutation of its HF modules' rows
(q/k/v interleaved per query group, gate/up per TP rank), and (B @ A) permutes its rows with B, so HF module
i gets ``W_i + s * B_i @ A`` with B_i its rows of B and the one shared A.
"""
from __future__ import annotations

import torch

from mindspeed_lora.checkpoint.lora_layout import LoraCheckpointConfig, peft_name, target_of
from mindspeed_lora.checkpoint.weight_map import BoundRule


def merge_delta(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                dtype: torch.dtype) -> torch.Tensor:
    """W + scaling * B @ A in fp32, cast once to ``dtype`` (a bf16 model stays bf16, rounded once)."""
    return (weight.float() + scaling * (b.float() @ a.float())).to(dtype)


def is_adapted(rule: BoundRule, lora: LoraCheckpointConfig) -> bool:
    return rule.mcore_key.endswith(".weight") and target_of(rule.mcore_key) in lora.target_modules


def merged_parts(rule: BoundRule, base_parts: list[torch.Tensor], adapter, lora: LoraCheckpointConfig,
                 dtype: torch.dtype) -> list[torch.Tensor]:
    """The HF tensors of one base rule with the adapter merged (``adapter``: a source with PEFT names)."""
    if not is_adapted(rule, lora):
        return [t.to(dtype) for t in base_parts]
    a = adapter.read(peft_name(rule.hf_names[0], "A"))
    return [merge_delta(w, a, adapter.read(peft_name(name, "B")), lora.scaling, dtype)
            for name, w in zip(rule.hf_names, base_parts)]
