"""Megatron checkpoints written by MindSpeed-LLM or Megatron-LM: described as if this project had written them.

Such a checkpoint has the same directory layout, key names and tensor layouts as ours (docs/formats.md) but no
``mindspeed_lora.json``: its shards pickle Megatron's args (an argparse.Namespace) instead. The architecture
is taken from the ``config.json`` of the HF model it came from (``--hf-cfg-dir``), then checked against the
pickled args and the tensors: TP and PP from the ``mp_rank_*`` directories, the layers per stage from the
keys, the LoRA settings from ``--lora-r`` / ``--lora-alpha`` / ``--lora-target-modules`` in the args (else
the convert flags). The result is the metadata dict ``mindspeed_lora.json`` would hold.
"""
from __future__ import annotations

import argparse
import os
import re

from mindspeed_lora.checkpoint import megatron_io
from mindspeed_lora.errors import UserError
from mindspeed_lora.models.arch import ModelArch, dtype_name
from mindspeed_lora.models.family import read_hf_config

_SHARD_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")

# Megatron's args that fix tensor shapes or which tensors exist, and the architecture field each must equal
_ARGS_VS_ARCH = {
    "num_layers": lambda a: a.num_layers,
    "hidden_size": lambda a: a.hidden_size,
    "ffn_hidden_size": lambda a: a.ffn_hidden_size,
    "num_attention_heads": lambda a: a.num_attention_heads,
    "kv_channels": lambda a: a.kv_channels,
    "add_qkv_bias": lambda a: a.qkv_bias,
    "qk_layernorm": lambda a: a.qk_layernorm,
    "untie_embeddings_and_output_weights": lambda a: not a.tie_word_embeddings,
}


def _args_of(extra: dict, where: str) -> dict:
    args = extra.get("args")
    if isinstance(args, argparse.Namespace):
        return vars(args)
    if isinstance(args, dict):
        return args
    raise UserError(f"{where}: no Megatron args in the shard (key 'args'), so nothing tells which model and "
                    "layout it was saved with")


def _shard_layout(iter_dir: str) -> tuple[int, int]:
    ranks = set()
    for name in sorted(os.listdir(iter_dir)):
        m = _SHARD_DIR.match(name)
        if m:
            ranks.add((int(m[1]), int(m[2]) if m[2] is not None else None))
        elif name.startswith("mp_rank_"):
            raise UserError(f"{os.path.join(iter_dir, name)}: an expert-parallel shard; only dense models convert")
    if not ranks:
        raise UserError(f"{iter_dir}: no mp_rank_* shard directories")
    if len({p is None for _, p in ranks}) > 1:
        raise UserError(f"{iter_dir}: both mp_rank_TT and mp_rank_TT_PPP directories")
    tp = 1 + max(t for t, _ in ranks)
    pp = 1 if next(iter(ranks))[1] is None else 1 + max(p for _, p in ranks)
    missing = [megatron_io.shard_dir_name(t, p, pp) for t in range(tp) for p in range(pp)
               if (t, p if pp > 1 else None) not in ranks]
    if missing:
        raise UserError(f"{iter_dir}: shard directories missing: {', '.join(missing)}")
    return tp, pp


def describe(path: str, config_dir: str, what: str = "--load-dir") -> dict:
    """The ``mindspeed_lora.json`` contents for the foreign checkpoint at ``path``; UserError on a mismatch."""
    config_json = os.path.join(config_dir, "config.json")
    if not os.path.isfile(config_json):
        raise UserError(f"{what} {path}: a Megatron checkpoint without {megatron_io.METADATA}; its architecture "
                        f"comes from the HF model's config.json, which {config_dir} does not have")
    arch = ModelArch.from_hf_config(read_hf_config(config_dir), config_json)
    iter_dir = megatron_io.resolve_iteration_dir(path)
    iteration = megatron_io.read_latest_iteration(path)
    tp, pp = _shard_layout(iter_dir)
    readers = [megatron_io.ShardReader(megatron_io.shard_path(iter_dir, 0, p, pp)) for p in range(pp)]
    where = readers[0].path
    args = _args_of(readers[0].extra, where)

    for key, want in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp)):
        if key in args and args[key] != want:
            raise UserError(f"{where}: args.{key} is {args[key]}, but {iter_dir} holds {want} (shard directories)")
    if args.get("num_layers_per_virtual_pipeline_stage") or args.get("virtual_pipeline_model_parallel_size"):
        raise UserError(f"{where}: saved with virtual pipeline stages; only plain pipeline stages are read")
    for key, field in _ARGS_VS_ARCH.items():
        if args.get(key) is not None and args[key] != field(arch):
            raise UserError(f"{where}: args.{key} is {args[key]!r}, but {config_json} gives {field(arch)!r}: "
                            "--hf-cfg-dir is not the model this checkpoint was converted from")
    groups = args.get("num_query_groups") if args.get("group_query_attention") else args.get("num_attention_heads")
    if groups is not None and groups != arch.num_query_groups:
        raise UserError(f"{where}: {groups} query groups in the args, but {config_json} gives "
                        f"{arch.num_query_groups}: --hf-cfg-dir is not the model this checkpoint was converted from")

    counts = [len({int(m[1]) for k in r.keys() if (m := _LAYER.match(k))}) for r in readers]
    if sum(counts) != arch.num_layers:
        raise UserError(f"{iter_dir}: the shards hold {sum(counts)} decoder layers ({counts} per stage), "
                        f"{config_json} gives {arch.num_layers}")
    keys = readers[0].keys()
    lora = None
    if any(".lora_A." in k for k in keys) and args.get("lora_target_modules"):
        lora = {"r": int(args["lora_r"]), "alpha": float(args["lora_alpha"]), "dropout": 0.0,
                "target_modules": list(args["lora_target_modules"]), "use_rslora": False}
    tensor = next((k for k in keys if ".lora_" not in k), keys[0])
    return {"format_version": 1, "arch": arch.to_dict(), "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": pp, "num_layer_list": counts,
            "params_dtype": dtype_name(readers[0].dtype(tensor)), "lora": lora, "iteration": iteration}
