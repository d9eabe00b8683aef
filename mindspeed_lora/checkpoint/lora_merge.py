"""Merge a LoRA adapter into base weights: W + scaling * B @ A, computed in fp32 and cast once.

Merging happens on HF tensors: a fused megatron linear's rows are a permutation of its HF modules' rows
(q/k/v interleaved per query group, gate/up per TP rank), and (B @ A) permutes its rows with B, so HF module
i gets ``W_i + s * B_i @ A`` with B_i its rows of B and the one shared A.
"""
from __future__ import annotations

import torch

from mindspeed_lora.checkpoint.lora_layout import LoraCheckpointConfig, adapter_rules, peft_name, target_of
from mindspeed_lora.checkpoint.sharding import read_shard
from mindspeed_lora.checkpoint.weight_map import BoundRule
from mindspeed_lora.models.arch import ModelArch
from mindspeed_lora.models.builder import ParallelOptions


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


def merge_into_megatron_model(model, adapter, arch: ModelArch, lora: LoraCheckpointConfig) -> None:
    """Add the adapter's delta to the adapted linears of a TP=1, PP=1 megatron model, in megatron's layout.

    The precision test's megatron side: the delta is built from the adapter's megatron-layout A and B
    (B's rows in the fused linear's order), independently of the per-HF-module merge of ``merged_parts``.
    """
    par = ParallelOptions()
    params = {k.replace(".base_layer.", "."): v for k, v in model.state_dict(keep_vars=True).items()}
    rules = adapter_rules(arch, par, 0, lora.target_modules)
    kw = dict(num_heads=arch.num_attention_heads, num_groups=arch.num_query_groups, head_dim=arch.kv_channels)

    def full(rule):
        return read_shard(rule.kind, rule.hf_names, [adapter.shape(n) for n in rule.hf_names], adapter.read,
                          0, 1, **kw)

    with torch.no_grad():
        for key, rule in rules.items():
            if not key.endswith(".lora_A.default.weight"):
                continue
            b_rule = rules[key.replace(".lora_A.", ".lora_B.")]
            w = params[rule.base_key]
            w.copy_(merge_delta(w, full(rule), full(b_rule), lora.scaling, w.dtype))
