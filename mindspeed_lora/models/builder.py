"""Build megatron-core GPT models from a ``ModelArch``: TransformerConfig, layer spec, and the model chunk.

The layer spec is megatron-core's local spec; device kernels and LoRA linears enter by swapping classes in
that spec (``spec_hooks``), never by patching module methods.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from mindspeed_lora.errors import UserError
from mindspeed_lora.models.arch import ModelArch
from mindspeed_lora.models.norm import RMSNorm


@dataclass
class ParallelOptions:
    """How the model is split; sizes must match megatron's parallel_state."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    num_layer_list: list[int] | None = None
    """Decoder layers per pipeline stage (uneven PP); None splits evenly."""

    def __post_init__(self):
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            self.sequence_parallel = False  # megatron ignores SP without TP; so do we
        if self.num_layer_list is not None and len(self.num_layer_list) != self.pipeline_model_parallel_size:
            raise UserError(
                f"--num-layer-list has {len(self.num_layer_list)} entries; expected one per pipeline stage "
                f"({self.pipeline_model_parallel_size})"
            )


@dataclass
class ModelOptions:
    """Numerics and memory options of the built model."""

    params_dtype: torch.dtype = torch.float32
    recompute_granularity: str | None = None  # full | selective
    recompute_method: str | None = None  # uniform | block | split (models/recompute.py)
    recompute_num_layers: int | None = None
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    use_cpu_initialization: bool = True
    init_method_std: float = 0.02
    spec_hooks: list[Callable] = field(default_factory=list)
    """Each hook takes (layer_spec, arch, config) and returns a layer spec (fused ops, LoRA linears)."""


def layer_counts(arch: ModelArch, parallel: ParallelOptions) -> list[int]:
    pp = parallel.pipeline_model_parallel_size
    if parallel.num_layer_list is not None:
        counts = list(parallel.num_layer_list)
        if sum(counts) != arch.num_layers or min(counts) < 1:
            raise UserError(
                f"--num-layer-list {counts} must hold {pp} positive numbers summing to num_layers={arch.num_layers}"
            )
        return counts
    if arch.num_layers % pp:
        raise UserError(
            f"--pipeline-model-parallel-size={pp} does not divide num_layers={arch.num_layers}; "
            "give --num-layer-list for an uneven split"
        )
    return [arch.num_layers // pp] * pp


def pipeline_layout(counts: list[int]) -> list[list[str]] | None:
    """megatron's pipeline_model_parallel_layout for per-stage layer counts: embedding first, loss last."""
    if len(counts) == 1:
        return None
    layout = [["decoder"] * n for n in counts]
    layout[0].insert(0, "embedding")
    layout[-1].append("loss")
    return layout


def layer_offset(arch: ModelArch, parallel: ParallelOptions, pp_rank: int) -> int:
    """Global index of the first decoder layer held by pipeline stage ``pp_rank``."""
    return sum(layer_counts(arch, parallel)[:pp_rank])


def build_transformer_config(arch: ModelArch, parallel: ParallelOptions, options: ModelOptions):
    from megatron.core.transformer.transformer_config import TransformerConfig

    arch.check_tensor_parallel(parallel.tensor_model_parallel_size)
    counts = layer_counts(arch, parallel)
    dtype = options.params_dtype
    # split recompute is ours (the layer class checkpoints itself); megatron must not checkpoint too
    megatron_full = options.recompute_granularity == "full" and not split_recompute(options)
    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        attention_dropout=options.attention_dropout,
        hidden_dropout=options.hidden_dropout,
        init_method_std=options.init_method_std,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=options.use_cpu_initialization,
        # The fused kernels these flags select are CUDA-only (apex / TE); our own fused ops come in via the spec.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        recompute_granularity=None if split_recompute(options) else options.recompute_granularity,
        recompute_method=options.recompute_method if megatron_full else None,
        recompute_num_layers=options.recompute_num_layers if megatron_full else None,
    )
    layout = pipeline_layout(counts)
    if layout is not None:
        kwargs["pipeline_model_parallel_layout"] = layout
    if megatron_full and options.recompute_method is None:
        kwargs["recompute_method"] = "uniform"
        kwargs["recompute_num_layers"] = options.recompute_num_layers or 1
    return TransformerConfig(**kwargs)


def split_recompute(options: ModelOptions) -> bool:
    return options.recompute_granularity == "full" and options.recompute_method == "split"


def build_layer_spec(arch: ModelArch, config, options: ModelOptions):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(qk_layernorm=arch.qk_layernorm, normalization="RMSNorm")
    sub = spec.submodules
    sub.input_layernorm = sub.pre_mlp_layernorm = RMSNorm
    if arch.qk_layernorm:
        sub.self_attention.submodules.q_layernorm = sub.self_attention.submodules.k_layernorm = RMSNorm
    if split_recompute(options):
        from mindspeed_lora.models.recompute import SplitRecomputeTransformerLayer

        spec.module = SplitRecomputeTransformerLayer
    for hook in options.spec_hooks:
        spec = hook(spec, arch, config)
    return spec


def build_gpt_model(
    arch: ModelArch,
    parallel: ParallelOptions,
    options: ModelOptions | None = None,
    *,
    pre_process: bool,
    post_process: bool,
    config=None,
):
    """One model chunk for this rank's pipeline stage; parallel_state must be initialised."""
    from megatron.core.models.gpt import GPTModel

    options = options or ModelOptions()
    config = config or build_transformer_config(arch, parallel, options)
    set_rope_attention_factor(config, arch.rope_attention_factor())  # before the spec: fused rope steps aside
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    spec = build_layer_spec(arch, config, options)
    stage_layers = layer_counts(arch, parallel)[parallel_state.get_pipeline_model_parallel_rank()]
    # A block spec (not a layer spec) so that the final norm is the same class as the layers' norms.
    block = TransformerBlockSubmodules(layer_specs=[spec] * stage_layers,
                                       layer_norm=spec.submodules.input_layernorm)
    model = GPTModel(
        config=config,
        transformer_layer_spec=block,
        vocab_size=arch.vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
        parallel_output=True,
    )
    # HF computes rope frequencies with its own scaling rules (llama3 with the config's factors); use them.
    if hasattr(model, "rotary_pos_emb"):
        model.rotary_pos_emb.inv_freq = arch.rope_inv_freq().to(model.rotary_pos_emb.inv_freq.device)
    return model


def set_rope_attention_factor(config, factor: float) -> None:
    """Make megatron's attention multiply cos and sin by ``factor`` (YaRN).

    megatron-core applies YaRN's factor where the config has ``yarn_rotary_scaling_factor``, as
    0.1·m·ln(s) + 1 over 0.1·m_all·ln(s) + 1 from ``yarn_mscale`` (m) and ``yarn_mscale_all_dim`` (m_all); with
    s = e and m_all = 0 that is 0.1·m + 1, so m = 10·(factor - 1) gives any factor exactly."""
    if factor == 1.0:
        return
    config.yarn_rotary_scaling_factor = math.e
    config.yarn_mscale = 10.0 * (factor - 1.0)
    config.yarn_mscale_all_dim = 0.0
