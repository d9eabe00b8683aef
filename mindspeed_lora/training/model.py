"""Model side of a training run: architecture from --load, the stage's model chunk, its weights, DDP.

The architecture is read from what convert_ckpt.py saved (``mindspeed_lora.json``) or from an HF
``config.json``; architecture flags given on the command line override it. The chunk for this rank's pipeline
stage is megatron-core's GPTModel built from the family's layer spec (LoRA and fused ops enter through spec
hooks), then wrapped in megatron's DistributedDataParallel.
"""
from __future__ import annotations

import dataclasses

import torch

from mindspeed_lora.checkpoint import loading
from mindspeed_lora.checkpoint.loading import LoadSource, inspect_load_dir  # noqa: F401 (inference imports it here)
from mindspeed_lora.checkpoint.sources import MegatronCheckpoint
from mindspeed_lora.errors import UserError
from mindspeed_lora.models.arch import ModelArch, dtype_name
from mindspeed_lora.models.builder import ModelOptions, ParallelOptions, build_gpt_model, layer_counts
from mindspeed_lora.training import neftune, positions
from mindspeed_lora.training.config import ModelSetup, TrainingConfig


def resolve_arch(source: LoadSource, setup: ModelSetup, what: str = "--load") -> ModelArch:
    """The checkpoint's architecture with command-line overrides applied and checked."""
    arch = loading.resolve_arch(source.path, what, source.iteration)
    if setup.arch_overrides:
        arch = dataclasses.replace(arch, **setup.arch_overrides)
    where = f"{what} {source.path}"
    if setup.untie_embeddings and arch.tie_word_embeddings:
        raise UserError(f"--untie-embeddings-and-output-weights: {where} ties the output layer to the embedding")
    if setup.require_qk_layernorm and not arch.qk_layernorm:
        raise UserError(f"--qk-layernorm: the {arch.family} model at {where} has no q/k layernorm")
    if setup.require_qkv_bias and not arch.qkv_bias:
        raise UserError(f"--add-qkv-bias: the {arch.family} model at {where} has no q/k/v bias")
    if setup.family is not None and setup.family != arch.family:
        raise UserError(f"--model-type-hf {setup.family}: {where} is a {arch.family} model")
    if setup.rope_scaling:
        have = arch.rope_scaling or {}
        kind = arch.rope_kind if have else None
        for key, want in setup.rope_scaling.items():
            got = kind if key == "rope_type" else arch.rope_setting(key)
            if got != want:
                raise UserError(f"rope scaling {key} {want!r} on the command line, but {where} has {got!r} "
                                f"(its rope_scaling: {arch.rope_scaling})")
    if arch.num_attention_heads % arch.num_query_groups:
        raise UserError(f"num_attention_heads {arch.num_attention_heads} is not a multiple of num_query_groups "
                        f"{arch.num_query_groups}")
    return arch


def check_layout(source: LoadSource, arch: ModelArch, parallel: ParallelOptions, what: str = "--load") -> None:
    """Refuse a Megatron checkpoint whose TP/PP layout or architecture differs from this run."""
    loading.check_layout(MegatronCheckpoint(source.path, what, iteration=source.iteration), arch, parallel)


def model_options(cfg: TrainingConfig, lora_hooks: list) -> ModelOptions:
    m = cfg.model
    return ModelOptions(
        params_dtype=m.params_dtype,
        recompute_granularity=m.recompute_granularity,
        recompute_method=m.recompute_method,
        recompute_num_layers=m.recompute_num_layers,
        attention_dropout=m.attention_dropout,
        hidden_dropout=m.hidden_dropout,
        init_method_std=m.init_method_std,
        spec_hooks=list(lora_hooks) + list(cfg.spec_hooks),
    )


def build_stage_model(arch: ModelArch, cfg: TrainingConfig, options: ModelOptions, is_first: bool, is_last: bool):
    """This rank's GPTModel chunk, on the accelerator, with positioned rotary embeddings installed."""
    from mindspeed_lora.accelerator import get_accelerator

    model = build_gpt_model(arch, cfg.parallel, options, pre_process=is_first, post_process=is_last)
    model.config.calculate_per_token_loss = cfg.batch.calculate_per_token_loss
    # micro-batches padded to their own length need their shapes sent between pipeline stages
    model.config.variable_seq_lengths = not cfg.data.pad_to_seq_length
    model = model.to(get_accelerator().device())
    rope = positions.install(model)
    neftune.install(model, cfg.model.neftune_noise_alpha, cfg.parallel.sequence_parallel,
                    cfg.parallel.tensor_model_parallel_size)
    return model, rope


def checkpoint_weight_keys(model) -> dict[str, torch.Tensor]:
    """Model weights as a checkpoint names them: no megatron _extra_state, ``.base_layer.`` folded away."""
    return loading.params_by_checkpoint_key(model)


def load_base_weights(model, source: LoadSource, arch: ModelArch, parallel: ParallelOptions, tp_rank: int,
                      pp_rank: int) -> None:
    """This rank's base weights from the HF dir or Megatron checkpoint iteration (``checkpoint.loading``,
    streamed)."""
    loading.load_base_weights(model, source.path, arch, parallel, tp_rank, pp_rank, source.iteration)


def wrap_ddp(model, cfg: TrainingConfig):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        # bf16/fp16 grads accumulate and reduce in fp32, as megatron does for --bf16
        grad_reduce_in_fp32=cfg.model.params_dtype != torch.float32,
        overlap_grad_reduce=cfg.optim.overlap_grad_reduce,
        overlap_param_gather=cfg.optim.overlap_param_gather,
        use_distributed_optimizer=cfg.optim.use_distributed_optimizer,
    )
    ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    ddp.broadcast_params()  # every data-parallel replica starts from DP rank 0's weights
    return ddp


def build_optimizer(chunks: list, cfg: TrainingConfig, train_iters: int):
    """megatron's optimizer (distributed or not) and its learning-rate scheduler."""
    from megatron.core.optimizer import OptimizerConfig, ParamKey, get_megatron_optimizer, get_standard_config_overrides
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optim
    dtype = cfg.model.params_dtype
    ocfg = OptimizerConfig(
        optimizer=o.optimizer, lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, sgd_momentum=o.sgd_momentum,
        clip_grad=o.clip_grad, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, params_dtype=dtype,
        initial_loss_scale=o.initial_loss_scale, loss_scale=o.loss_scale,
        use_distributed_optimizer=o.use_distributed_optimizer,
        overlap_param_gather_with_optimizer_step=False,
    )
    overrides = get_standard_config_overrides(ocfg)  # no decay on biases and norms, as without overrides
    if o.lora_b_lr_ratio is not None:  # LoRA+: a schedule of its own for the B matrices, scaled
        overrides[ParamKey(name="*.lora_B.*")] = {"max_lr": o.lr * o.lora_b_lr_ratio,
                                                  "min_lr": o.min_lr * o.lora_b_lr_ratio}
    optimizer = get_megatron_optimizer(ocfg, chunks, config_overrides=overrides)
    warmup, decay = o.schedule(train_iters)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=o.lr_warmup_init, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=decay, lr_decay_style=o.lr_decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=decay, wd_incr_style="constant",
        # on resume the schedule is the checkpoint's (megatron's --use-checkpoint-opt_param-scheduler)
        use_checkpoint_opt_param_scheduler=True,
    )
    return optimizer, scheduler


def metadata_for(arch: ModelArch, parallel: ParallelOptions, params_dtype: torch.dtype, lora: dict | None,
                 iteration: int) -> dict:
    return {
        "format_version": 1,
        "arch": arch.to_dict(),
        "tensor_model_parallel_size": parallel.tensor_model_parallel_size,
        "pipeline_model_parallel_size": parallel.pipeline_model_parallel_size,
        "num_layer_list": layer_counts(arch, parallel),
        "params_dtype": dtype_name(params_dtype),
        "lora": lora,
        "iteration": iteration,
    }
