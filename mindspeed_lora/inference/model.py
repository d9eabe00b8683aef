"""Build the model and tokenizer for inference/evaluation from ``--load`` (HF dir or Megatron checkpoint)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable

from mindspeed_lora.checkpoint import megatron_io
from mindspeed_lora.errors import UserError
from mindspeed_lora.inference.engine import InferenceEngine
from mindspeed_lora.inference.kv_cache import kv_cache_spec_hook
from mindspeed_lora.models.arch import ModelArch, dtype_from_name
from mindspeed_lora.models.builder import ModelOptions, ParallelOptions, build_gpt_model

HF_CONFIG_DIR = "hf_config"


@dataclass
class ModelSource:
    """Where the weights come from and how the model is laid out on this rank."""

    load: str
    """HF model directory or Megatron checkpoint directory."""
    lora_load: str | None = None
    """LoRA adapter checkpoint (Megatron layout) applied on top of ``load``."""
    ckpt_step: int | None = None
    """--ckpt-step: the iteration read of ``lora_load`` when given, else of ``load``; None: the latest."""
    tensor_model_parallel_size: int = 1
    params_dtype: str | None = None
    """float32 / bfloat16 / float16; None keeps the checkpoint's dtype."""
    use_cuda_graph: bool = True
    spec_hooks: list[Callable] = field(default_factory=list)
    """Extra layer-spec hooks (fused ops); the KV-cache attention is always added last."""
    arch_overrides: dict = field(default_factory=dict)
    """ModelArch field -> value from architecture flags (checked against the checkpoint as training does)."""
    untie_embeddings: bool = False
    require_qk_layernorm: bool = False
    require_qkv_bias: bool = False
    rope_scaling: dict = field(default_factory=dict)
    """Rope-scaling flags given ({rope_scaling key: value}): checked against the checkpoint."""
    seq_length: int | None = None
    """Longest prompt + generated text; None: the model's max_position_embeddings."""
    lora: object | None = None
    """LoraConfig of the --lora-* flags (None without --lora-target-modules); the adapter checkpoint's own
    settings are used when it records them, and must agree with these."""

    def __post_init__(self):
        if not self.load:
            raise UserError("--load is required: a Megatron checkpoint or an HF model directory")
        if not os.path.isdir(self.load):
            raise UserError(f"--load {self.load}: no such directory")
        if self.lora_load is not None and not os.path.isdir(self.lora_load):
            raise UserError(f"--lora-load {self.lora_load}: no such directory")
        megatron_io.check_iteration_flag("--ckpt-step", self.ckpt_step)
        if self.tensor_model_parallel_size < 1:
            raise UserError(f"--tensor-model-parallel-size {self.tensor_model_parallel_size}: expected >= 1")
        if self.seq_length is not None and self.seq_length < 2:
            raise UserError(f"--seq-length {self.seq_length}: expected >= 2")


def model_source_from_args(args) -> ModelSource:
    """The model flags shared by inference.py and evaluation.py."""
    from mindspeed_lora.arguments.mindspeed_llm import rope_scaling_flags
    from mindspeed_lora.training.config import ARCH_FLAGS

    if args.pipeline_model_parallel_size != 1:
        raise UserError("inference keeps the whole model on each rank: split it with --tensor-model-parallel-size "
                        f"(--pipeline-model-parallel-size={args.pipeline_model_parallel_size} is not supported)")
    if args.transformer_impl == "transformer_engine":
        raise UserError("--transformer-impl transformer_engine: not supported; layers come from this project's "
                        "spec (use --transformer-impl local, the default)")
    return ModelSource(
        load=args.load, lora_load=args.lora_load, ckpt_step=args.ckpt_step,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        params_dtype=default_dtype_name(args.bf16, args.fp16), use_cuda_graph=args.use_cuda_graph,
        spec_hooks=fused_ops_hooks(args),
        arch_overrides={f: getattr(args, flag) for flag, f in ARCH_FLAGS.items() if getattr(args, flag) is not None},
        untie_embeddings=args.untie_embeddings_and_output_weights, require_qk_layernorm=args.qk_layernorm,
        require_qkv_bias=args.add_qkv_bias, rope_scaling=rope_scaling_flags(args), seq_length=args.seq_length,
        lora=_lora_flags(args),
    )


def _lora_flags(args):
    if not args.lora_target_modules:
        return None
    from mindspeed_lora.lora import lora_config_from_args

    return lora_config_from_args(args)


def inspect_load(path: str, iteration: int | None = None, what: str = "--load"):
    """What --load points at (HF dir or Megatron checkpoint, at ``iteration``); the same rules as training's
    --load."""
    from mindspeed_lora.training.model import inspect_load_dir

    return inspect_load_dir(path, what, iteration)


def _iterations(source: ModelSource) -> tuple[int | None, int | None]:
    """--ckpt-step's iteration of (--load, --lora-load): the adapter's when there is one, as in training."""
    return (None, source.ckpt_step) if source.lora_load else (source.ckpt_step, None)


def checkpoint_kind(path: str) -> str:
    """"hf" or "megatron"; a UserError says what neither layout would contain."""
    return inspect_load(path).kind


def resolve_arch(source: ModelSource) -> ModelArch:
    """The checkpoint's architecture, with architecture flags applied and checked as training does."""
    from mindspeed_lora.training.config import ModelSetup
    from mindspeed_lora.training.model import resolve_arch as arch_of

    setup = ModelSetup(load=source.load, arch_overrides=dict(source.arch_overrides),
                       untie_embeddings=source.untie_embeddings, require_qk_layernorm=source.require_qk_layernorm,
                       require_qkv_bias=source.require_qkv_bias, rope_scaling=dict(source.rope_scaling))
    return arch_of(inspect_load(source.load, _iterations(source)[0]), setup)


def tokenizer_dir(load: str, explicit: str | None) -> str:
    """--tokenizer-name-or-path, else the HF dir itself, else the hf_config/ a converted checkpoint carries."""
    if explicit:
        if not os.path.isdir(explicit):
            raise UserError(f"--tokenizer-name-or-path {explicit}: no such directory")
        return explicit
    for candidate in (load, os.path.join(load, HF_CONFIG_DIR)):
        if any(os.path.isfile(os.path.join(candidate, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
            return candidate
    raise UserError(f"no tokenizer files in {load} or {os.path.join(load, HF_CONFIG_DIR)}; "
                    "pass --tokenizer-name-or-path")


def load_tokenizer(path: str, use_fast: bool = True):
    from mindspeed_lora.data.encoder import load_hf_tokenizer

    return load_hf_tokenizer(path, use_fast)


def build_inference_engine(source: ModelSource, tp_rank: int) -> tuple[InferenceEngine, ModelArch]:
    """This rank's TP shard of the model with weights (and LoRA) loaded, wrapped for generation."""
    from mindspeed_lora.accelerator import get_accelerator
    from mindspeed_lora.checkpoint import loading

    arch = resolve_arch(source)
    dtype = dtype_from_name(source.params_dtype or arch.torch_dtype)
    acc = get_accelerator()
    parallel = ParallelOptions(tensor_model_parallel_size=source.tensor_model_parallel_size)
    load_iteration, lora_iteration = _iterations(source)
    loaded = inspect_load(source.load, load_iteration)
    if loaded.kind == "megatron":  # before building: a model for another TP layout cannot even be built
        from mindspeed_lora.training.model import check_layout

        check_layout(loaded, arch, parallel)
    hooks = list(source.spec_hooks)
    lora = None
    if source.lora_load is not None:
        if lora_iteration is not None:  # an iteration not saved fails before the build
            inspect_load(source.lora_load, lora_iteration, "--lora-load")
        from mindspeed_lora.lora.spec import lora_spec_hook

        # the adapter's own settings (the flags, when given, must agree: checked by load_lora_weights);
        # dropout and CCLoRA are training-only
        lora = source.lora or loading.resolve_lora_config(source.lora_load, lora_iteration)
        hooks.append(lora_spec_hook(dataclasses.replace(lora, dropout=0.0, fusion=False)))
    hooks.append(kv_cache_spec_hook)
    options = ModelOptions(params_dtype=dtype, use_cpu_initialization=acc.device_type == "cpu", spec_hooks=hooks)
    model = build_gpt_model(arch, parallel, options, pre_process=True, post_process=True)
    model = model.to(acc.device())
    loading.load_base_weights(model, source.load, arch, parallel, tp_rank, 0, loaded.iteration)
    if lora is not None:
        loading.load_lora_weights(model, source.lora_load, source.lora, parallel, tp_rank, 0, lora_iteration)
    for p in model.parameters():
        p.requires_grad_(False)
    max_len = min(source.seq_length or arch.max_position_embeddings, arch.max_position_embeddings)
    engine = InferenceEngine(model, max_len, use_cuda_graph=source.use_cuda_graph and acc.device_type == "cuda",
                             sliding_window=arch.sliding_window)
    return engine, arch


def fused_ops_hooks(args) -> list[Callable]:
    """The fused-op layer-spec hook for the --use-fused-* / --use-flash-attn flags, where the parser has them."""
    if not hasattr(args, "use_flash_attn"):
        return []
    from mindspeed_lora.arguments.fused_ops import fused_ops_config
    from mindspeed_lora.ops.spec import fused_ops_spec_hook

    return [fused_ops_spec_hook(fused_ops_config(args))]


def default_dtype_name(bf16: bool, fp16: bool) -> str | None:
    if bf16 and fp16:
        raise UserError("--bf16 and --fp16 are exclusive")
    return "bfloat16" if bf16 else "float16" if fp16 else None

