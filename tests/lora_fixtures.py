"""peft oracles for the LoRA tests: a tiny HF model with peft adapters, and those adapters in our layout.

Our layers share one A across q/k/v (linear_qkv) and across gate/up (linear_fc1), so the peft model is given
identical A's there; then our shared A's gradient is the sum of peft's. B's are fused into megatron's row
layout (qkv interleaved per query group, fc1 [gate; up]) with the checkpoint sharding helpers.

"Full" tensors below are in the TP=1 megatron layout, keyed by global megatron names
``decoder.layers.{i}.{path}.lora_{A,B}.default.weight``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from mindspeed_lora.checkpoint.sharding import interleave_qkv, split_full
from mindspeed_lora.models.family import GATE_UP, QKV, REPLICATED, ROW

R, ALPHA = 4, 8
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# megatron path -> the peft modules it fuses (order = megatron row order)
FUSED = {
    "self_attention.linear_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attention.linear_proj": ("self_attn.o_proj",),
    "mlp.linear_fc1": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.linear_fc2": ("mlp.down_proj",),
}
# (megatron path, factor) -> how the TP=1 tensor is split over TP ranks
KINDS = {
    ("self_attention.linear_qkv", "A"): REPLICATED, ("self_attention.linear_qkv", "B"): QKV,
    ("self_attention.linear_proj", "A"): ROW, ("self_attention.linear_proj", "B"): REPLICATED,
    ("mlp.linear_fc1", "A"): REPLICATED, ("mlp.linear_fc1", "B"): GATE_UP,
    ("mlp.linear_fc2", "A"): ROW, ("mlp.linear_fc2", "B"): REPLICATED,
}


def key_of(layer: int, path: str, factor: str) -> str:
    return f"decoder.layers.{layer}.{path}.lora_{factor}.default.weight"


def parse_key(key: str) -> tuple[int, str, str]:
    parts = key.split(".")
    return int(parts[2]), ".".join(parts[3:5]), parts[5][-1]


def peft_model(hf_dir: str, seed: int = 0, dropout: float = 0.0):
    """The HF model of ``hf_dir`` with peft LoRA on all seven linears: shared A's where we share, random B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model = get_peft_model(hf, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout,
                                          target_modules=PEFT_TARGETS))
    gen = torch.Generator().manual_seed(seed)
    mods = dict(model.base_model.model.named_modules())
    # scaled so that s·B·A is about the size of the base weights: it changes the logits clearly while the
    # model stays well conditioned (huge adapters saturate softmax and amplify fp32 rounding)
    with torch.no_grad():
        for i in range(hf.config.num_hidden_layers):
            for names in FUSED.values():
                first = mods[f"model.layers.{i}.{names[0]}"]
                first.lora_A["default"].weight.copy_(torch.randn(first.lora_A["default"].weight.shape,
                                                                 generator=gen) * 0.1)
                for n in names:
                    m = mods[f"model.layers.{i}.{n}"]
                    m.lora_A["default"].weight.copy_(first.lora_A["default"].weight)
                    m.lora_B["default"].weight.copy_(torch.randn(m.lora_B["default"].weight.shape,
                                                                 generator=gen) * 0.1)
    return model.eval()


def peft_full(model, arch, grads: bool = False) -> dict[str, torch.Tensor]:
    """peft's adapters (or their grads) as TP=1 megatron tensors; a shared A's grad is the sum over its users."""
    mods = dict(model.base_model.model.named_modules())
    out = {}
    for i in range(arch.num_layers):
        for path, names in FUSED.items():
            peft_mods = [mods[f"model.layers.{i}.{n}"] for n in names]
            a = [m.lora_A["default"].weight for m in peft_mods]
            b = [m.lora_B["default"].weight for m in peft_mods]
            if grads:
                a, b = [t.grad for t in a], [t.grad for t in b]
                full_a = torch.stack(a).sum(0)
            else:
                full_a = a[0]
            if path.endswith("linear_qkv"):
                full_b = interleave_qkv(*b, arch.num_query_groups)
            else:
                full_b = torch.cat(b, dim=0)  # fc1: [gate; up]; single modules: itself
            out[key_of(i, path, "A")] = full_a.detach().clone()
            out[key_of(i, path, "B")] = full_b.detach().clone()
    return out


def shard(key: str, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    _, path, factor = parse_key(key)
    return split_full(KINDS[(path, factor)], full, tp, rank)


def unshard(key: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of ``shard`` over all TP ranks' tensors (rank order)."""
    _, path, factor = parse_key(key)
    kind = KINDS[(path, factor)]
    if kind == REPLICATED:
        return shards[0]
    if kind == QKV:
        return torch.cat(shards, dim=0)
    if kind == ROW:
        return torch.cat(shards, dim=1)
    halves = [s.chunk(2, dim=0) for s in shards]
    return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])


def load_adapters(model, full: dict[str, torch.Tensor], layer_offset: int, tp: int, rank: int) -> int:
    """Copy TP=1 adapters into this rank's model chunk (layer keys local to its stage); returns count."""
    state = dict(model.named_parameters())
    n = 0
    with torch.no_grad():
        for name, p in state.items():
            if ".lora_" not in name:
                continue
            layer, path, factor = parse_key(name)
            key = key_of(layer + layer_offset, path, factor)
            p.copy_(shard(key, full[key], tp, rank))
            n += 1
    return n


def gather_full(model, layer_offset: int, grads: bool = False) -> dict[str, torch.Tensor]:
    """This stage's adapters (or grads) all-gathered over TP into TP=1 tensors with global keys."""
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    tp = ps.get_tensor_model_parallel_world_size()
    out = {}
    for name, p in model.named_parameters():
        if ".lora_" not in name:
            continue
        t = p.grad if grads else p.detach()
        assert t is not None, f"{name} has no grad"
        shards = [t]
        if tp > 1:
            shards = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(shards, t.contiguous(), group=group)
        layer, path, factor = parse_key(name)
        key = key_of(layer + layer_offset, path, factor)
        out[key] = unshard(key, shards)
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
