"""megatron-core modules that run the fused ops; ``spec.py`` swaps them into the local GPT layer spec.

Each class keeps the constructor and forward signature of the megatron class it replaces, and a class
attribute ``force_impl`` (None: the accelerator's kernel) that ``spec.py`` sets on a subclass when a config
forces one implementation (tests). ``unsupported_*`` say why a config cannot use a class; the spec hook then
keeps megatron's own and logs the reason.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.module import MegatronModule

from mindspeed_lora.ops.attention import attention
from mindspeed_lora.ops.rms_norm import rms_norm
from mindspeed_lora.ops.rope import apply_rotary_emb, rope_cos_sin
from mindspeed_lora.ops.swiglu import swiglu

# --------------------------------------------------------------------------------------------- RMSNorm


def unsupported_rms_norm(config) -> str | None:
    if config.normalization != "RMSNorm":
        return f"normalization is {config.normalization}"
    if config.layernorm_zero_centered_gamma:
        return "zero-centered gamma"
    return None


class FusedRMSNorm(torch.nn.Module):
    """RMSNorm with megatron's norm constructor (config, hidden_size, eps); parameter ``weight`` as torch's.

    Under sequence parallelism the weight is marked ``sequence_parallel`` so megatron all-reduces its gradient
    over the TP group (each rank saw a slice of the sequence).
    """

    force_impl: str | None = None

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                 zero_centered_gamma: bool = False, normalization: str = "RMSNorm"):
        super().__init__()
        self.eps = eps
        # created as mindspeed_lora.models.norm.RMSNorm, the class it replaces: params_dtype, on the CPU for
        # CPU initialisation
        device = torch.device("cpu") if config.use_cpu_initialization else None
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., hidden_size] -> same shape."""
        return rms_norm(x, self.weight, self.eps, force_impl=self.force_impl)


# ------------------------------------------------------------------------------------------- attention


def unsupported_attention(config) -> str | None:
    if config.context_parallel_size != 1:
        return "context parallelism"
    if getattr(config, "softmax_type", "vanilla") != "vanilla":
        return f"softmax_type {config.softmax_type}"
    if config.window_size is not None:
        return "sliding-window attention"
    if config.apply_query_key_layer_scaling:
        return "apply_query_key_layer_scaling"
    return None


class FusedDotProductAttention(MegatronModule):
    """Core attention (megatron's ``DotProductAttention`` signature) on ``mindspeed_lora.ops.attention``.

    Masks: ``packed_seq_params`` (THD, cu_seqlens) -> causal within each packed sequence; an integer
    ``attention_mask`` [b, s] -> segment ids (causal within each run of equal ids); a bool ``attention_mask``
    (True = masked) -> used as given; None -> causal.
    """

    force_impl: str | None = None

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        reason = unsupported_attention(config)
        if reason:
            raise ValueError(f"FusedDotProductAttention does not support {reason}")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.softmax_scale = softmax_scale if softmax_scale is not None else config.kv_channels ** -0.5
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """q [sq, b, np, hn], k/v [sk, b, ng, hn] (THD: [t, n, hn]) -> [sq, b, np*hn] (THD: [t, np*hn])."""
        if attention_bias is not None:
            raise ValueError("FusedDotProductAttention: attention_bias is not supported")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        kwargs = {"softmax_scale": self.softmax_scale, "force_impl": self.force_impl,
                  "dropout_p": self.dropout_p if self.training else 0.0}
        if packed_seq_params is not None:
            if packed_seq_params.qkv_format != "thd":
                raise ValueError(f"packed_seq_params.qkv_format={packed_seq_params.qkv_format!r}; expected 'thd'")
            if attention_mask is not None:
                raise ValueError("give packed_seq_params or attention_mask, not both")
            for padded, actual in ((packed_seq_params.cu_seqlens_q_padded, packed_seq_params.cu_seqlens_q),
                                   (packed_seq_params.cu_seqlens_kv_padded, packed_seq_params.cu_seqlens_kv)):
                if padded is not None and padded is not actual and not torch.equal(padded, actual):
                    raise ValueError("padded THD sequences (cu_seqlens_*_padded != cu_seqlens_*) are not supported")
            kwargs.update(cu_seqlens_q=packed_seq_params.cu_seqlens_q, cu_seqlens_kv=packed_seq_params.cu_seqlens_kv,
                          max_seqlen_q=packed_seq_params.max_seqlen_q, max_seqlen_kv=packed_seq_params.max_seqlen_kv)
        elif attention_mask is None:
            if mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
                raise ValueError(f"attention mask type {mask_type} needs an attention_mask")
        elif attention_mask.dtype == torch.bool:
            kwargs["attention_mask"] = attention_mask
        elif not attention_mask.dtype.is_floating_point and attention_mask.dim() == 2:
            kwargs["segment_ids"] = attention_mask
        else:
            raise ValueError(f"attention_mask {attention_mask.dtype} {tuple(attention_mask.shape)}: expected a bool "
                             "mask (True = masked) or integer segment ids [b, s]")
        if kwargs["dropout_p"] > 0 and not self.config.sequence_parallel:
            # as megatron: dropout draws from the model-parallel RNG stream
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = attention(query, key, value, **kwargs)
        else:
            out = attention(query, key, value, **kwargs)
        return out.reshape(*out.shape[:-2], -1)


# -------------------------------------------------------------------------------------------------- MLP


def unsupported_swiglu(config) -> str | None:
    if not config.gated_linear_unit or config.activation_func is not F.silu:
        return "the MLP is not SwiGLU (gated_linear_unit with silu)"
    if config.activation_func_clamp_value is not None or config.glu_linear_offset != 0.0:
        return "clamped or offset GLU"
    if config.use_te_activation_func or config.bias_activation_fusion:
        return "another fused activation is configured"
    return None


class FusedSwiGLUMLP(MLP):
    """megatron's MLP with the SwiGLU of ``linear_fc1``'s output ([gate | up]) done by the fused op.

    Only ``forward`` differs; cases the fused op does not cover (per-token expert scales) take MLP's own path.
    A subclass rather than MLP's activation-function seam, which needs ``config.use_te_activation_func`` set:
    a config flag that would silently turn every other MLP built from that config into silu-without-gating.
    Its one cost: TransformerLayer recognises only MLP itself and logs "Unknown MLP type ... Using default
    kwargs" per layer; the default it means is megatron's TP group, the one our models use.
    """

    force_impl: str | None = None

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        """[s, b, h] -> ([s, b, h], bias or None)."""
        if per_token_scale is not None or unsupported_swiglu(self.config):
            return super().forward(hidden_states, per_token_scale=per_token_scale, **kwargs)
        intermediate, bias = self.linear_fc1(hidden_states)
        if bias is not None:
            intermediate = intermediate + bias
        return self.linear_fc2(swiglu(intermediate, force_impl=self.force_impl))


# ------------------------------------------------------------------------------------------------- RoPE


def unsupported_rope(config) -> str | None:
    if config.rotary_interleaved:
        return "interleaved rotary"
    if config.multi_latent_attention:
        return "multi-latent attention"
    if config.apply_rope_fusion or getattr(config, "fused_single_qkv_rope", False):
        return "megatron's own rope fusion is on"
    if config.context_parallel_size != 1:
        return "context parallelism"
    if hasattr(config, "yarn_rotary_scaling_factor"):
        return "YaRN's attention factor (megatron's rope applies it)"
    return None


_FORWARD = inspect.signature(SelfAttention.forward)


class FusedRopeSelfAttention(SelfAttention):
    """SelfAttention whose rotary embedding is the fused rope op.

    megatron applies rope inside ``Attention.forward`` with no seam, so ``forward`` hands megatron
    ``rotary_pos_emb=None`` and ``get_query_key_value_tensors`` (called once by that forward, after the q/k
    layernorms) rotates q and k itself, dense or packed (THD positions restart at each sequence). Inference
    with a KV cache, precomputed cos/sin and YaRN scaling take megatron's path unchanged.
    """

    force_impl: str | None = None

    def forward(self, *args, **kwargs):
        bound = _FORWARD.bind(self, *args, **kwargs)
        a = bound.arguments
        if not self._fusable(a):
            return super().forward(*args, **kwargs)
        emb = a["rotary_pos_emb"]
        q_emb, k_emb = emb if isinstance(emb, tuple) else (emb, emb)
        self._pending_rope = (q_emb, k_emb, a.get("packed_seq_params"))
        a["rotary_pos_emb"] = None
        try:
            return super().forward(*bound.args[1:], **bound.kwargs)
        finally:
            self._pending_rope = None

    def _fusable(self, a) -> bool:
        if a.get("rotary_pos_emb") is None or unsupported_rope(self.config):
            return False
        if any(a.get(k) is not None for k in ("inference_context", "inference_params", "rotary_pos_cos",
                                                "rotary_pos_sin", "rotary_pos_cos_sin")):
            return False
        no_rope = self.config.no_rope_freq
        if no_rope and no_rope[self.layer_number - 1]:
            return False
        from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
            _yarn_get_concentration_factor_from_config,
        )

        return _yarn_get_concentration_factor_from_config(self.config) == 1.0

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, *args, **kwargs):
        out = super().get_query_key_value_tensors(hidden_states, key_value_states, *args, **kwargs)
        pending = getattr(self, "_pending_rope", None)
        if pending is None:
            return out
        if len(out) not in (3, 4):
            raise RuntimeError("FusedRopeSelfAttention: megatron returned an unsplit qkv; rope cannot be applied")
        q_emb, k_emb, packed = pending
        cu_q = cu_kv = None
        if packed is not None and packed.qkv_format == "thd":
            cu_q = packed.cu_seqlens_q_padded if packed.cu_seqlens_q_padded is not None else packed.cu_seqlens_q
            cu_kv = packed.cu_seqlens_kv_padded if packed.cu_seqlens_kv_padded is not None else packed.cu_seqlens_kv
        # (query, key, value) or (query, key, value, gate)
        return (self._rotate(out[0], q_emb, cu_q), self._rotate(out[1], k_emb, cu_kv), *out[2:])

    def _rotate(self, x, freqs, cu_seqlens):
        """x [s, b, n, d] (THD: [t, 1, n, d] before megatron squeezes it), freqs [max_s, 1, 1, r]."""
        if freqs is None:
            return x
        cos, sin = rope_cos_sin(freqs, x.shape[0], cu_seqlens, dtype=x.dtype)
        return apply_rotary_emb(x, cos, sin, force_impl=self.force_impl)
