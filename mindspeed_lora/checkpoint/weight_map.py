"""Which HF tensors make each megatron parameter of one pipeline stage, and loading HF weights into a model.

Each rank reads only the slices of the HF safetensors that its own TP shard and PP stage hold.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from tqdm import tqdm

from mindspeed_lora.checkpoint.sharding import read_shard
from mindspeed_lora.errors import UserError
from mindspeed_lora.models.arch import ModelArch
from mindspeed_lora.models.builder import ParallelOptions, layer_counts, layer_offset
from mindspeed_lora.models.family import VOCAB, WeightRule, get_family

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class BoundRule:
    """A weight rule bound to concrete names: the megatron key local to its stage and the HF names."""

    mcore_key: str
    hf_names: tuple[str, ...]
    kind: str


def stage_rules(arch: ModelArch, parallel: ParallelOptions, pp_rank: int) -> dict[str, BoundRule]:
    """megatron key (layer index local to the stage) -> BoundRule, for every weight of stage ``pp_rank``."""
    family = get_family(arch.family)
    counts = layer_counts(arch, parallel)
    offset = layer_offset(arch, parallel, pp_rank)
    first, last = pp_rank == 0, pp_rank == len(counts) - 1
    out: dict[str, BoundRule] = {}
    rules: list[WeightRule] = family.weight_rules(arch.tie_word_embeddings)
    for rule in rules:
        if rule.per_layer:
            for local in range(counts[pp_rank]):
                key = f"decoder.layers.{local}.{rule.mcore}"
                names = tuple(f"model.layers.{offset + local}.{h}" for h in rule.hf)
                out[key] = BoundRule(key, names, rule.kind)
        elif rule.mcore.startswith("embedding.") and first:
            out[rule.mcore] = BoundRule(rule.mcore, rule.hf, rule.kind)
        elif not rule.mcore.startswith("embedding.") and last:
            out[rule.mcore] = BoundRule(rule.mcore, rule.hf, rule.kind)
    if arch.tie_word_embeddings and last and not first:
        # The last stage keeps its own copy of the tied embedding as output_layer.weight.
        out["output_layer.weight"] = BoundRule("output_layer.weight", ("model.embed_tokens.weight",), VOCAB)
    return out


def global_layer_key(local_key: str, offset: int) -> str:
    m = _LAYER.match(local_key)
    return f"decoder.layers.{int(m.group(1)) + offset}.{m.group(2)}" if m else local_key


def is_weight_key(key: str) -> bool:
    """Keys of real weights (not megatron's `_extra_state` bookkeeping, not LoRA adapters)."""
    return not key.endswith("_extra_state") and ".lora_" not in key


def load_hf_weights(model, reader, arch: ModelArch, parallel: ParallelOptions, tp_rank: int, pp_rank: int,
                    progress: bool = False) -> None:
    """Copy this rank's slices of an HF checkpoint into ``model`` (a GPTModel chunk for ``pp_rank``)."""
    rules = stage_rules(arch, parallel, pp_rank)
    state = {k: v for k, v in model.state_dict(keep_vars=True).items() if is_weight_key(k)}
    state = {k.replace(".base_layer.", "."): v for k, v in state.items()}
    missing = sorted(set(rules) - set(state))
    unexpected = sorted(set(state) - set(rules))
    if missing or unexpected:
        raise UserError(
            f"model of family {arch.family} does not match its weight table: missing in model {missing[:5]}, "
            f"not in table {unexpected[:5]}"
        )
    tp = parallel.tensor_model_parallel_size
    items = sorted(rules.items())
    for key, rule in tqdm(items, desc="loading HF weights", disable=not progress):
        for name in rule.hf_names:
            if name not in reader:
                raise UserError(f"{reader.model_dir}: tensor {name!r} (for {key}) not found")
        shapes = [reader.shape(n) for n in rule.hf_names]
        shard = read_shard(
            rule.kind, rule.hf_names, shapes, reader.read, tp_rank, tp,
            num_heads=arch.num_attention_heads, num_groups=arch.num_query_groups, head_dim=arch.kv_channels,
        )
        param = state[key]
        if tuple(shard.shape) != tuple(param.shape):
            raise UserError(
                f"{reader.model_dir}: {rule.hf_names} give shape {tuple(shard.shape)} for {key}, "
                f"the model expects {tuple(param.shape)} (config.json does not match the weights?)"
            )
        with torch.no_grad():
            param.copy_(shard.to(param.dtype))
