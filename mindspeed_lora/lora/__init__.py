"""LoRA for megatron-core's tensor-parallel linears (TP/SP/PP-aware) and CCLoRA, its communication overlap.

``config`` is importable without megatron (argument parsing); the rest loads megatron-core on first use.
"""
from __future__ import annotations

import importlib

from mindspeed_lora.lora.config import ALL_LINEAR, LoraConfig, expand_targets, lora_config_from_args

_LAZY = {
    "LoraColumnParallelLinear": "layers",
    "LoraRowParallelLinear": "layers",
    "lora_seed": "layers",
    "lora_spec_hook": "spec",
    "lora_modules": "spec",
    "init_lora_parameters": "spec",
    "is_lora_key": "spec",
    "lora_parameters": "spec",
    "mark_only_lora_trainable": "spec",
    "adapter_state_dict": "spec",
    "require_embedding_output_grad": "spec",
    "prepare_lora_model": "spec",
    "adapters_disabled": "toggle",
}

__all__ = ["ALL_LINEAR", "LoraConfig", "expand_targets", "lora_config_from_args", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"mindspeed_lora.lora.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'mindspeed_lora.lora' has no attribute {name!r}")
