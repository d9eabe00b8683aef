"""A model family: how an HF config becomes a megatron-core TransformerConfig, and the HF<->mcore weight table.

The weight table is data: one ``WeightRule`` per megatron parameter, naming the HF tensors it is built
from and the ``kind`` of transform/sharding that relates them (see ``mindspeed_lora.checkpoint.sharding``).
Adding a family is one small file that calls ``register_family``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable

from mindspeed_lora.errors import UserError

# Sharding kinds (how one megatron tensor relates to HF tensors and is split across tensor-parallel ranks)
REPLICATED = "replicated"  # the same on every TP rank (norms)
VOCAB = "vocab"  # embedding / output layer: rows split across TP
COLUMN = "column"  # column-parallel linear weight or bias: rows split
ROW = "row"  # row-parallel linear weight: columns split
QKV = "qkv"  # [q; k; v] from three HF tensors, interleaved per query group, then rows split
GATE_UP = "gate_up"  # [gate_i; up_i] per TP rank from HF gate and up


@dataclass(frozen=True)
class WeightRule:
    """One megatron parameter and the HF tensors it comes from.

    ``mcore``/``hf`` are suffixes: layer rules are relative to ``decoder.layers.{i}.`` and ``model.layers.{i}.``.
    """

    mcore: str
    hf: tuple[str, ...]
    kind: str
    per_layer: bool = True


@dataclass(frozen=True)
class ModelFamily:
    name: str
    """``--model-type-hf`` value (qwen3, llama3, qwen2, mistral)."""
    hf_model_types: tuple[str, ...]
    """config.json ``model_type`` values that map to this family."""
    qk_layernorm: bool
    qkv_bias: bool
    hf_architecture: str
    """The ``architectures`` entry written to an exported config.json."""
    extra_rules: tuple[WeightRule, ...] = field(default_factory=tuple)

    def weight_rules(self, tied_embeddings: bool) -> list[WeightRule]:
        rules = [
            WeightRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB, per_layer=False),
            WeightRule("input_layernorm.weight", ("input_layernorm.weight",), REPLICATED),
            WeightRule(
                "self_attention.linear_qkv.weight",
                ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
                QKV,
            ),
            WeightRule("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), ROW),
            WeightRule("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), REPLICATED),
            WeightRule("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), GATE_UP),
            WeightRule("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), ROW),
            WeightRule("decoder.final_layernorm.weight", ("model.norm.weight",), REPLICATED, per_layer=False),
        ]
        if self.qkv_bias:
            rules.append(
                WeightRule(
                    "self_attention.linear_qkv.bias",
                    ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
                    QKV,
                )
            )
        if self.qk_layernorm:
            rules += [
                WeightRule("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), REPLICATED),
                WeightRule("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), REPLICATED),
            ]
        if not tied_embeddings:
            rules.append(WeightRule("output_layer.weight", ("lm_head.weight",), VOCAB, per_layer=False))
        return rules + list(self.extra_rules)


FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> ModelFamily:
    _load_builtin()
    if name not in FAMILIES:
        raise UserError(f"unknown model type {name!r}: expected one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_for_hf_config(hf_config: dict, source: str = "config.json") -> ModelFamily:
    _load_builtin()
    model_type = hf_config.get("model_type")
    for fam in FAMILIES.values():
        if model_type in fam.hf_model_types:
            return fam
    supported = sorted(t for f in FAMILIES.values() for t in f.hf_model_types)
    raise UserError(f"{source}: model_type {model_type!r} is not supported; expected one of {supported}")


def read_hf_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{model_dir}: no config.json (expected a HuggingFace model directory)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from e


_loaded: list[Callable] = []


def _load_builtin() -> None:
    if not _loaded:
        from mindspeed_lora.models import llama, mistral, qwen2, qwen3  # noqa: F401  (register themselves)

        _loaded.append(True)
