"""Test-only builders for the converter tests: tiny HF models, HF-side LoRA adapters, and Megatron LoRA
checkpoints written straight from the layout contract (plain loops, not the package's shard transforms).

Contract (docs/formats.md, "LoRA checkpoints"), per TP rank r of t:
  linear_qkv   A [r, in] on every rank; B rows = for each query group g of rank r: [B_q(g) ; B_k(g) ; B_v(g)]
  linear_fc1   A [r, in] on every rank; B rows = [B_gate block r ; B_up block r]
  linear_proj, linear_fc2   A columns block r; B [out, r] on every rank
Keys ``decoder.layers.{local}.{path}.lora_{A,B}.default.weight``, {local} counted from the stage's first layer.
"""
from __future__ import annotations

import json
import os

import torch

from mindspeed_lora import tiny
from mindspeed_lora.models.arch import ModelArch
from mindspeed_lora.models.family import read_hf_config

# megatron linear -> (path inside a layer, HF modules in megatron row order)
LINEARS = {
    "linear_qkv": ("self_attention.linear_qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    "linear_proj": ("self_attention.linear_proj", ("self_attn.o_proj",)),
    "linear_fc1": ("mlp.linear_fc1", ("mlp.gate_proj", "mlp.up_proj")),
    "linear_fc2": ("mlp.linear_fc2", ("mlp.down_proj",)),
}
ALL_TARGETS = tuple(LINEARS)
ROW_PARALLEL = ("linear_proj", "linear_fc2")


def tiny_hf(family: str, path: str, seed: int = 0, dtype: str = "float32", layers: int = 4, lively: bool = False,
            **overrides):
    """A tiny HF model (8 heads, 4 query groups so TP 4 divides them, ``layers`` layers) and tokenizer."""
    tiny.build_tokenizer(path)
    hf = tiny.build_hf_model(family, None, seed=seed, **{"num_attention_heads": 8, "num_key_value_heads": 4,
                                                         "num_hidden_layers": layers, **overrides})
    if lively:  # linear weights x8: logits far from uniform, so a wrong layout shows in them
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                    p.mul_(8.0)
    hf = hf.to(getattr(torch, dtype))
    hf.save_pretrained(path)
    return hf


def hf_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of an HF safetensors dir (index or single file)."""
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.isfile(index) \
        else ["model.safetensors"]
    out = {}
    for f in files:
        out.update(load_file(os.path.join(path, f)))
    return out


def arch_of(path: str) -> ModelArch:
    return ModelArch.from_hf_config(read_hf_config(path))


def in_out(hf: dict, layer: int, module: str) -> tuple[int, int]:
    w = hf[f"model.layers.{layer}.{module}.weight"]
    return w.shape[1], w.shape[0]


def random_adapter(hf: dict, arch: ModelArch, r: int, seed: int = 0, targets=ALL_TARGETS,
                   dtype=torch.float32) -> dict:
    """{(layer, target): {"A": [r, in], "B": [B per HF module]}} with one A shared by a fused linear's modules."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(arch.num_layers):
        for t in targets:
            _, modules = LINEARS[t]
            fan_in = in_out(hf, i, modules[0])[0]
            a = (torch.randn(r, fan_in, generator=g) * 0.3).to(dtype)
            bs = [(torch.randn(in_out(hf, i, m)[1], r, generator=g) * 0.3).to(dtype) for m in modules]
            out[(i, t)] = {"A": a, "B": bs}
    return out


def _blocks(n: int, t: int, rank: int) -> slice:
    size = n // t
    return slice(rank * size, (rank + 1) * size)


def contract_b(target: str, bs: list[torch.Tensor], arch: ModelArch, tp: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s B of a column-parallel linear, built row by row from the HF modules' B."""
    if target == "linear_fc1":
        gate, up = bs
        return torch.cat([gate[_blocks(gate.shape[0], tp, rank)], up[_blocks(up.shape[0], tp, rank)]])
    bq, bk, bv = bs
    d, groups = arch.kv_channels, arch.num_query_groups
    per = arch.num_attention_heads // groups
    rows = []
    for g in range(groups)[_blocks(groups, tp, rank)]:
        rows += [bq[g * per * d:(g + 1) * per * d], bk[g * d:(g + 1) * d], bv[g * d:(g + 1) * d]]
    return torch.cat(rows)


def contract_shards(adapter: dict, arch: ModelArch, tp: int, counts: list[int]) -> dict:
    """{(tp_rank, pp_rank): {megatron key: tensor}} of the adapter in the contract's layout."""
    shards = {}
    offset = 0
    for pp, n in enumerate(counts):
        for rank in range(tp):
            sd = {}
            for local in range(n):
                for (layer, target), ab in adapter.items():
                    if layer != offset + local:
                        continue
                    path = LINEARS[target][0]
                    key = f"decoder.layers.{local}.{path}.lora_"
                    if target in ROW_PARALLEL:
                        a = ab["A"]
                        sd[key + "A.default.weight"] = a[:, _blocks(a.shape[1], tp, rank)].clone()
                        sd[key + "B.default.weight"] = ab["B"][0].clone()
                    else:
                        sd[key + "A.default.weight"] = ab["A"].clone()
                        sd[key + "B.default.weight"] = contract_b(target, ab["B"], arch, tp, rank)
            shards[(rank, pp)] = sd
        offset += n
    return shards


def write_lora_checkpoint(path: str, shards: dict, arch: ModelArch, tp: int, counts: list[int], r: int,
                          alpha: float, targets=ALL_TARGETS, use_rslora: bool = False, iteration: int = 7,
                          params_dtype: str = "float32") -> None:
    """A LoRA training checkpoint (adapter keys only) as the contract and docs/formats.md describe it."""
    pp = len(counts)
    for (rank, stage), sd in shards.items():
        name = f"mp_rank_{rank:02d}" if pp == 1 else f"mp_rank_{rank:02d}_{stage:03d}"
        d = os.path.join(path, f"iter_{iteration:07d}", name)
        os.makedirs(d, exist_ok=True)
        torch.save({"model": sd, "iteration": iteration, "checkpoint_version": 3.0, "args": {}},
                   os.path.join(d, "model_optim_rng.pt"))
    with open(os.path.join(path, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))
    meta = {"format_version": 1, "arch": arch.to_dict(), "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": pp, "num_layer_list": counts, "params_dtype": params_dtype,
            "lora": {"r": r, "alpha": alpha, "dropout": 0.0, "target_modules": list(targets),
                     "use_rslora": use_rslora},
            "iteration": iteration}
    with open(os.path.join(path, "mindspeed_lora.json"), "w") as f:
        json.dump(meta, f)


def merged_oracle(hf: dict, adapter: dict, scaling: float, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """HF tensors with W + scaling * B_i @ A in fp32 (one cast to ``dtype``) for every adapted module."""
    out = {k: v.to(dtype) for k, v in hf.items()}
    for (layer, target), ab in adapter.items():
        for module, b in zip(LINEARS[target][1], ab["B"]):
            name = f"model.layers.{layer}.{module}.weight"
            out[name] = (hf[name].float() + scaling * (b.float() @ ab["A"].float())).to(dtype)
    return out


def peft_state(adapter: dict) -> dict[str, torch.Tensor]:
    """The adapter under PEFT's saved names (each HF module with the shared A)."""
    out = {}
    for (layer, target), ab in adapter.items():
        for module, b in zip(LINEARS[target][1], ab["B"]):
            base = f"base_model.model.model.layers.{layer}.{module}"
            out[f"{base}.lora_A.weight"] = ab["A"].clone()
            out[f"{base}.lora_B.weight"] = b
    return out


def megatron_shard(path: str, rank: int, stage: int, pp: int) -> dict:
    name = f"mp_rank_{rank:02d}" if pp == 1 else f"mp_rank_{rank:02d}_{stage:03d}"
    for it in sorted(os.listdir(path)):
        if it.startswith("iter_") and ".tmp" not in it:
            return torch.load(os.path.join(path, it, name, "model_optim_rng.pt"), weights_only=True)
    raise FileNotFoundError(path)


def expected_base_shards(hf: dict, arch: ModelArch, tp: int, counts: list[int]) -> dict:
    """{(tp_rank, pp_rank): {megatron key: tensor}} of a base model as FACTS.md describes the layout."""
    shards = {}
    vocab = slice(None)
    offset = 0
    for pp, n in enumerate(counts):
        for rank in range(tp):
            vocab = _blocks(arch.vocab_size, tp, rank)
            sd = {}
            if pp == 0:
                sd["embedding.word_embeddings.weight"] = hf["model.embed_tokens.weight"][vocab]
            for local in range(n):
                h, m = f"model.layers.{offset + local}.", f"decoder.layers.{local}."
                sd[m + "input_layernorm.weight"] = hf[h + "input_layernorm.weight"]
                qkv = [hf[h + f"self_attn.{x}_proj.weight"] for x in "qkv"]
                sd[m + "self_attention.linear_qkv.weight"] = contract_b("linear_qkv", qkv, arch, tp, rank)
                if h + "self_attn.q_proj.bias" in hf:
                    bias = [hf[h + f"self_attn.{x}_proj.bias"] for x in "qkv"]
                    sd[m + "self_attention.linear_qkv.bias"] = contract_b("linear_qkv", bias, arch, tp, rank)
                if h + "self_attn.q_norm.weight" in hf:
                    sd[m + "self_attention.q_layernorm.weight"] = hf[h + "self_attn.q_norm.weight"]
                    sd[m + "self_attention.k_layernorm.weight"] = hf[h + "self_attn.k_norm.weight"]
                o = hf[h + "self_attn.o_proj.weight"]
                sd[m + "self_attention.linear_proj.weight"] = o[:, _blocks(o.shape[1], tp, rank)]
                sd[m + "pre_mlp_layernorm.weight"] = hf[h + "post_attention_layernorm.weight"]
                gate_up = [hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"]]
                sd[m + "mlp.linear_fc1.weight"] = contract_b("linear_fc1", gate_up, arch, tp, rank)
                down = hf[h + "mlp.down_proj.weight"]
                sd[m + "mlp.linear_fc2.weight"] = down[:, _blocks(down.shape[1], tp, rank)]
            if pp == len(counts) - 1:
                sd["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
                if not arch.tie_word_embeddings:
                    sd["output_layer.weight"] = hf["lm_head.weight"][vocab]
                elif len(counts) > 1:  # megatron keeps the tied embedding's copy on the last stage
                    sd["output_layer.weight"] = hf["model.embed_tokens.weight"][vocab]
            shards[(rank, pp)] = sd
        offset += n
    return shards
