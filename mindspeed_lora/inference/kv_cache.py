"""A static KV cache that enters megatron's GPTModel through the layer spec (no patching of SelfAttention).

``KVCacheAttention`` replaces the layer spec's ``core_attention`` (megatron's DotProductAttention). Megatron's
SelfAttention still computes q, k, v (qk-norm, QKV bias, LoRA on linear_qkv) and applies the rotary embedding
it is given; this class only decides which keys each query sees:

* no ``AttentionStep`` attached: plain causal attention (like DotProductAttention, used e.g. for logits);
* a step without slots: the keys of this forward only, under ``step.mask`` (recompute without a cache);
* a step with slots: this forward's keys/values are written into a preallocated cache at ``step.slots``
  and the queries attend over the whole cache under ``step.mask``.

The cache has a fixed shape [b, groups/tp, max_len, head_dim] per layer and every per-step quantity lives in a
tensor, so a decode step has fixed shapes and no host sync: it can be captured in a CUDA graph.
Positions are cache slots: prompts are left-padded so they all end at the same slot, pad slots are masked out
as keys, and the rotary embedding is taken at the slot index. RoPE only sees position differences, so this is
the same attention as HF's left padding with position_ids = cumsum(mask) - 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class AttentionStep:
    """What every KVCacheAttention of one model reads during one forward (the engine fills it in).

    mask:  additive [b, 1, sq, sk], 0 where the query may attend to the key, -inf elsewhere (sk = max_len with
           a cache).
    slots: long [sq], the cache slots this forward's tokens occupy; None to attend without a cache.
    """

    mask: torch.Tensor | None = None
    slots: torch.Tensor | None = None
    _grouped: dict = field(default_factory=dict, repr=False)

    def set(self, mask: torch.Tensor, slots: torch.Tensor | None) -> None:
        self.mask, self.slots = mask, slots
        self._grouped = {}

    def grouped_mask(self, rep: int) -> torch.Tensor:
        """The mask for queries laid out [b, groups, rep * sq, d] (rows r * sq + i see what row i sees);
        made once per forward and shared by the layers."""
        if rep == 1 or self.mask.shape[2] == 1:
            return self.mask
        if rep not in self._grouped:
            self._grouped[rep] = self.mask.repeat(1, 1, rep, 1)
        return self._grouped[rep]


class KVCacheAttention(torch.nn.Module):
    """Scaled dot-product attention over a static KV cache; a drop-in for megatron's core attention.

    forward(query [sq, b, np, hn], key/value [sk, b, ng, hn], attention_mask ignored) -> [sq, b, np * hn],
    where np / ng are this TP rank's query heads / key-value groups.
    """

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type: str = "self",
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__()
        from megatron.core import parallel_state

        if pg_collection is not None and hasattr(pg_collection, "tp"):
            tp = pg_collection.tp.size()
        else:
            tp = parallel_state.get_tensor_model_parallel_world_size()
        self.config = config
        self.layer_number = layer_number
        self.num_heads = config.num_attention_heads // tp
        self.num_groups = (config.num_query_groups or config.num_attention_heads) // tp
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.step: AttentionStep | None = None
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("KVCacheAttention serves unpacked inference batches only")
        sq, b = query.shape[0], query.shape[1]
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k = key.permute(1, 2, 0, 3)  # [b, ng, sk, hn]
        v = value.permute(1, 2, 0, 3)
        rep = self.num_heads // self.num_groups
        step = self.step
        if step is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale,
                                                 enable_gqa=rep > 1)
        else:
            if step.slots is not None:
                self.k_cache.index_copy_(2, step.slots, k.to(self.k_cache.dtype))
                self.v_cache.index_copy_(2, step.slots, v.to(self.v_cache.dtype))
                k, v = self.k_cache, self.v_cache
            # GQA without copying keys: the rep query heads of a group become rep * sq query rows of that
            # group (megatron orders query heads group by group), so k and v are used as they are.
            q = q.reshape(b, self.num_groups, rep * sq, self.head_dim)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=step.grouped_mask(rep), scale=self.softmax_scale)
        out = out.reshape(b, self.num_heads, sq, self.head_dim)
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.num_heads * self.head_dim)


def kv_cache_spec_hook(spec, arch, config):
    """ModelOptions.spec_hooks entry: the layer's core attention becomes KVCacheAttention."""
    spec.submodules.self_attention.submodules.core_attention = KVCacheAttention
    return spec


def cache_layers(model) -> list[KVCacheAttention]:
    layers = [m for m in model.modules() if isinstance(m, KVCacheAttention)]
    if not layers:
        raise RuntimeError("model has no KVCacheAttention: build it with kv_cache_spec_hook in spec_hooks")
    return layers


class StaticKVCache:
    """The preallocated keys and values of every layer of one model for ``batch`` rows of ``max_len`` slots."""

    def __init__(self, model, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        self.layers = cache_layers(model)
        self.batch, self.max_len = batch, max_len
        for layer in self.layers:
            shape = (batch, layer.num_groups, max_len, layer.head_dim)
            layer.k_cache = torch.zeros(shape, dtype=dtype, device=device)
            layer.v_cache = torch.zeros(shape, dtype=dtype, device=device)

    def attach(self, step: AttentionStep | None) -> None:
        for layer in self.layers:
            layer.step = step

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep cache row ``rows[i]`` as row i (beam search); in place, so captured graphs stay valid."""
        for layer in self.layers:
            layer.k_cache.copy_(layer.k_cache.index_select(0, rows))
            layer.v_cache.copy_(layer.v_cache.index_select(0, rows))

    def release(self) -> None:
        self.attach(None)
        for layer in self.layers:
            layer.k_cache = layer.v_cache = None
