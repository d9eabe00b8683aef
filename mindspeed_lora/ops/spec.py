"""Fused ops into megatron's local GPT layer spec: ``FusedOpsConfig`` and the spec hook built from it.

``fused_ops_spec_hook(cfg)`` returns a hook for ``ModelOptions.spec_hooks`` (``hook(spec, arch, config) ->
spec``) that swaps, in a copy of the layer spec:

- the RMSNorm class of ``input_layernorm``, ``pre_mlp_layernorm`` and the q/k layernorms -> ``FusedRMSNorm``
  (``use_fused_rmsnorm``);
- the core attention -> ``FusedDotProductAttention`` (``use_flash_attn``): flash / cuDNN SDPA or varlen on
  CUDA, npu_fusion_attention on NPU; also what makes packed sequences (THD ``packed_seq_params``) and segment-id
  masks work, which megatron's local DotProductAttention refuses;
- the self-attention -> ``FusedRopeSelfAttention`` (``use_fused_rotary_pos_emb``);
- the MLP -> ``FusedSwiGLUMLP`` (``use_fused_swiglu``).

A swap the model's config cannot take (e.g. interleaved rotary) is skipped with the reason logged. The final
layernorm of the decoder block is not part of the layer spec and stays megatron's. Nothing here imports
megatron until a hook runs.
"""
from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass, fields

from mindspeed_lora.ops.dispatch import IMPLS

logger = logging.getLogger("mindspeed_lora.ops")

FLAG_NAMES = ("use_fused_rmsnorm", "use_fused_swiglu", "use_fused_rotary_pos_emb", "use_flash_attn")


@dataclass(frozen=True)
class FusedOpsConfig:
    """Which fused ops the model uses (MindSpeed-LLM's flag names)."""

    use_fused_rmsnorm: bool = False
    """RMSNorm kernel for the layer norms and the q/k norms (--use-fused-rmsnorm)."""
    use_fused_swiglu: bool = False
    """SwiGLU kernel in the MLP (--use-fused-swiglu)."""
    use_fused_rotary_pos_emb: bool = False
    """RoPE kernel on q and k (--use-fused-rotary-pos-emb)."""
    use_flash_attn: bool = False
    """Flash attention kernel; also enables packed (THD) sequences and segment-id masks (--use-flash-attn)."""
    force_impl: str | None = None
    """Run one implementation (reference, cuda or npu) instead of the accelerator's; for tests."""

    def __post_init__(self):
        if self.force_impl is not None and self.force_impl not in IMPLS:
            raise ValueError(f"FusedOpsConfig.force_impl={self.force_impl!r}; expected one of {IMPLS} or None")

    @classmethod
    def for_device(cls, device_type: str | None = None, **overrides) -> "FusedOpsConfig":
        """Every op on where the device has kernels (npu, cuda), off on the CPU; ``overrides`` win."""
        if device_type is None:
            from mindspeed_lora.accelerator import get_accelerator

            device_type = get_accelerator().device_type
        on = device_type in ("npu", "cuda")
        values = {name: on for name in FLAG_NAMES}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def enabled(self) -> list[str]:
        return [f.name for f in fields(self) if f.name in FLAG_NAMES and getattr(self, f.name)]


@functools.lru_cache(maxsize=None)
def _bind(cls: type, force_impl: str | None) -> type:
    """``cls`` itself, or a subclass of it running one forced implementation."""
    if force_impl is None:
        return cls
    return type(cls.__name__, (cls,), {"force_impl": force_impl, "__module__": cls.__module__,
                                       "__qualname__": f"{cls.__qualname__}[{force_impl}]"})


def fused_ops_spec_hook(cfg: FusedOpsConfig):
    """A ``ModelOptions.spec_hooks`` entry applying ``cfg`` to megatron's local GPT layer spec."""

    def hook(spec, arch, config):
        from megatron.core.transformer.attention import SelfAttention
        from megatron.core.transformer.identity_op import IdentityOp
        from megatron.core.transformer.mlp import MLP
        from megatron.core.transformer.torch_norm import L2Norm

        from mindspeed_lora.ops import layers

        spec = copy.deepcopy(spec)
        layer = spec.submodules
        attn = layer.self_attention
        swapped, skipped = [], []

        def allowed(name: str, reason: str | None) -> bool:
            if reason:
                skipped.append(f"{name} ({reason})")
            return not reason

        if cfg.use_fused_rmsnorm and allowed("rmsnorm", layers.unsupported_rms_norm(config)):
            norm = _bind(layers.FusedRMSNorm, cfg.force_impl)
            for owner, names in ((layer, ("input_layernorm", "pre_mlp_layernorm")),
                                 (attn.submodules, ("q_layernorm", "k_layernorm"))):
                for name in names:
                    if getattr(owner, name, None) not in (None, IdentityOp, L2Norm):
                        setattr(owner, name, norm)
            swapped.append("rmsnorm")
        if cfg.use_flash_attn and allowed("attention", layers.unsupported_attention(config)):
            attn.submodules.core_attention = _bind(layers.FusedDotProductAttention, cfg.force_impl)
            swapped.append("attention")
        if cfg.use_fused_rotary_pos_emb and allowed("rope", layers.unsupported_rope(config)):
            if attn.module is SelfAttention:
                attn.module = _bind(layers.FusedRopeSelfAttention, cfg.force_impl)
                swapped.append("rope")
            else:
                skipped.append(f"rope (self-attention is {attn.module.__name__})")
        if cfg.use_fused_swiglu and allowed("swiglu", layers.unsupported_swiglu(config)):
            if layer.mlp.module is MLP:
                layer.mlp.module = _bind(layers.FusedSwiGLUMLP, cfg.force_impl)
                swapped.append("swiglu")
            else:
                skipped.append(f"swiglu (MLP is {layer.mlp.module.__name__})")
        if swapped or skipped:
            logger.info("fused ops in the layer spec: %s%s%s", ", ".join(swapped) or "none",
                        f" (impl {cfg.force_impl})" if cfg.force_impl else "",
                        f"; kept megatron's for {', '.join(skipped)}" if skipped else "")
        return spec

    return hook
