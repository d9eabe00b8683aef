"""Typed configuration of a training run, built once from the parsed flags; library code never reads args.

``training_config_from_args(args)`` validates what can be checked without the model or the data (sizes,
combinations); checks that need the checkpoint or the dataset happen where those are opened.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch

from mindspeed_lora.arguments.common import parse_num_layer_list
from mindspeed_lora.arguments.mindspeed_llm import mindspeed_llm_notes, rope_scaling_flags
from mindspeed_lora.checkpoint import megatron_io
from mindspeed_lora.errors import UserError
from mindspeed_lora.models.builder import ParallelOptions

# flag -> ModelArch field, for architecture flags that override the checkpoint's architecture
ARCH_FLAGS = {
    "num_layers": "num_layers",
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_query_groups",
    "kv_channels": "kv_channels",
    "max_position_embeddings": "max_position_embeddings",
    "padded_vocab_size": "vocab_size",
    "norm_epsilon": "norm_eps",
    "rotary_base": "rope_theta",
}


@dataclass
class ModelSetup:
    """Where the weights come from and how the model is built."""

    load: str
    """Megatron checkpoint (converted or a training checkpoint) or HF model directory."""
    arch_overrides: dict = field(default_factory=dict)
    """ModelArch field -> value given on the command line."""
    untie_embeddings: bool = False
    """--untie-embeddings-and-output-weights was given: the checkpoint must not tie them."""
    require_qk_layernorm: bool = False
    require_qkv_bias: bool = False
    family: str | None = None
    """--model-type-hf: the family the checkpoint must be."""
    rope_scaling: dict = field(default_factory=dict)
    """The rope-scaling flags given ({rope_scaling key: value}): the checkpoint's must match."""
    params_dtype: torch.dtype = torch.float32
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    neftune_noise_alpha: float = 0.0
    """NEFTune: uniform noise on the embeddings while training (training.neftune); 0 is off."""

    def __post_init__(self):
        if self.recompute_granularity != "full" and (self.recompute_method or self.recompute_num_layers):
            raise UserError("--recompute-method / --recompute-num-layers need --recompute-granularity full")
        if self.recompute_method == "split" and self.recompute_num_layers is not None:
            raise UserError("--recompute-method split recomputes every layer; drop --recompute-num-layers")
        if self.recompute_num_layers is not None and self.recompute_num_layers < 1:
            raise UserError(f"--recompute-num-layers {self.recompute_num_layers}: expected a positive number")
        if self.neftune_noise_alpha < 0:
            raise UserError(f"--neftune-noise-alpha {self.neftune_noise_alpha}: expected >= 0")


@dataclass
class DataSetup:
    data_path: str
    seq_length: int
    split: str = "100,0,0"
    pad_to_seq_length: bool = True
    """False with --variable-seq-lengths / --no-pad-to-seq-lengths: pad to a multiple of 8."""
    neat_pack: bool = False
    """--neat-pack: attention_mask holds segment ids; attention and positions restart at every segment."""
    reset_attention: bool = False
    """--reset-attention-mask / --reset-position-ids: the same for packs, with segments from neat-pack ids
    when the data has them, else split after each end-of-document token."""
    seed: int = 1234
    shuffle: bool = True
    tokenizer: str | None = None
    """Needed only to find end-of-document tokens in packs without neat-pack segment ids."""

    def __post_init__(self):
        if self.seq_length is None or self.seq_length < 2:
            raise UserError(f"--seq-length {self.seq_length}: expected an integer of at least 2")


@dataclass
class BatchSetup:
    micro_batch_size: int
    global_batch_size: int
    train_iters: int | None = None
    train_epochs: float | None = None
    calculate_per_token_loss: bool = False

    def __post_init__(self):
        if self.micro_batch_size < 1:
            raise UserError(f"--micro-batch-size {self.micro_batch_size}: expected a positive number")
        if self.global_batch_size < 1:
            raise UserError(f"--global-batch-size {self.global_batch_size}: expected a positive number")
        if (self.train_iters is None) == (self.train_epochs is None):
            raise UserError("give exactly one of --train-iters and --train-epochs")
        if self.train_iters is not None and self.train_iters < 1:
            raise UserError(f"--train-iters {self.train_iters}: expected a positive number")
        if self.train_epochs is not None and self.train_epochs <= 0:
            raise UserError(f"--train-epochs {self.train_epochs}: expected a positive number")

    def microbatches(self, dp_size: int) -> int:
        per = self.micro_batch_size * dp_size
        if self.global_batch_size % per:
            raise UserError(
                f"--global-batch-size {self.global_batch_size} is not a multiple of --micro-batch-size "
                f"{self.micro_batch_size} x data-parallel size {dp_size}"
            )
        return self.global_batch_size // per


@dataclass
class OptimSetup:
    lr: float
    optimizer: str = "adam"
    min_lr: float = 0.0
    lr_decay_style: str = "linear"
    lr_decay_iters: int | None = None
    lr_warmup_fraction: float | None = None
    lr_warmup_iters: int = 0
    lr_warmup_init: float = 0.0
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.9
    initial_loss_scale: float = 2.0 ** 32
    loss_scale: float | None = None
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    lora_b_lr_ratio: float | None = None
    """LoRA+ (--loraplus-lr-ratio): the B matrices' learning rates are this multiple of the schedule's."""

    def __post_init__(self):
        if self.lr is None or self.lr < 0:
            raise UserError(f"--lr {self.lr}: expected a non-negative learning rate")
        if self.lora_b_lr_ratio is not None and not self.lora_b_lr_ratio > 0:
            raise UserError(f"--loraplus-lr-ratio {self.lora_b_lr_ratio}: expected a positive number")
        if self.min_lr > self.lr:
            raise UserError(f"--min-lr {self.min_lr} is above --lr {self.lr}")
        if self.lr_warmup_fraction is not None and self.lr_warmup_iters:
            raise UserError("give --lr-warmup-fraction or --lr-warmup-iters, not both")
        if self.lr_warmup_fraction is not None and not 0 <= self.lr_warmup_fraction < 1:
            raise UserError(f"--lr-warmup-fraction {self.lr_warmup_fraction}: expected a value in [0, 1)")
        if self.optimizer == "sgd" and self.use_distributed_optimizer:
            raise UserError("--use-distributed-optimizer shards Adam state; it does not support --optimizer sgd")
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise UserError("--overlap-param-gather needs --use-distributed-optimizer")

    def schedule(self, train_iters: int) -> tuple[int, int]:
        """(warmup steps, decay steps) in iterations."""
        decay = self.lr_decay_iters or train_iters
        warmup = int(self.lr_warmup_fraction * decay) if self.lr_warmup_fraction is not None else self.lr_warmup_iters
        if warmup >= decay:
            raise UserError(f"learning-rate warmup ({warmup} iterations) must be shorter than decay ({decay})")
        return warmup, decay


@dataclass
class CheckpointSetup:
    save: str | None = None
    save_interval: int | None = None
    save_optim: bool = True
    save_rng: bool = True
    load_optim: bool = True
    load_rng: bool = True
    finetune: bool = False
    lora_load: str | None = None
    ckpt_step: int | None = None
    """--ckpt-step: the iteration to read of --lora-load when given (the adapter a LoRA run resumes from), else of
    --load; None: the latest. A resume continues from it; with --finetune only its weights are read."""
    exit_signal: str | None = None
    """The signal that makes training save and exit (--exit-signal-handler); None: no handler."""
    exit_interval: int | None = None
    exit_duration_mins: float | None = None

    def __post_init__(self):
        if self.save_interval is not None and self.save_interval < 1:
            raise UserError(f"--save-interval {self.save_interval}: expected a positive number")
        if self.exit_interval is not None and self.exit_interval < 1:
            raise UserError(f"--exit-interval {self.exit_interval}: expected a positive number")
        if self.exit_duration_mins is not None and not self.exit_duration_mins > 0:
            raise UserError(f"--exit-duration-in-mins {self.exit_duration_mins}: expected a positive number")
        if self.save_interval is not None and self.save is None:
            raise UserError("--save-interval needs --save")
        megatron_io.check_iteration_flag("--ckpt-step", self.ckpt_step)

    @property
    def load_iteration(self) -> int | None:
        """The iteration of --load to read (None: its latest)."""
        return None if self.lora_load else self.ckpt_step

    @property
    def lora_load_iteration(self) -> int | None:
        """The iteration of --lora-load to read (None: its latest)."""
        return self.ckpt_step if self.lora_load else None


@dataclass
class LoggingSetup:
    log_interval: int = 1
    eval_interval: int | None = None
    eval_iters: int = 0
    tensorboard_dir: str | None = None
    loss_curve: str | None = None
    profile: bool = False
    profile_step_start: int = 10
    profile_step_end: int = 12
    profile_ranks: tuple[int, ...] = (0,)
    profile_save_path: str | None = None
    profile_record_shapes: bool = False
    profile_with_memory: bool = False
    manual_gc: bool = False
    manual_gc_interval: int = 0
    manual_gc_eval: bool = True

    def __post_init__(self):
        if self.manual_gc_interval < 0:
            raise UserError(f"--manual-gc-interval {self.manual_gc_interval}: expected 0 or a positive number")
        if self.manual_gc_interval and not self.manual_gc:
            raise UserError("--manual-gc-interval needs --manual-gc")
        if self.profile and not 1 <= self.profile_step_start < self.profile_step_end:
            raise UserError(f"--profile-step-start {self.profile_step_start} --profile-step-end "
                            f"{self.profile_step_end}: expected 1 <= start < end (iterations are 1-based)")
        if self.log_interval < 1:
            raise UserError(f"--log-interval {self.log_interval}: expected a positive number")
        if self.eval_interval is not None and self.eval_interval < 1:
            raise UserError(f"--eval-interval {self.eval_interval}: expected a positive number")


@dataclass
class TrainingConfig:
    model: ModelSetup
    parallel: ParallelOptions
    data: DataSetup
    batch: BatchSetup
    optim: OptimSetup
    checkpoint: CheckpointSetup
    logging: LoggingSetup
    seed: int = 1234
    lora: object | None = None
    """A ``mindspeed_lora.lora.LoraConfig`` when --lora-target-modules is given, else None (full fine-tuning)."""
    lora_fusion: bool = False
    spec_hooks: list = field(default_factory=list)
    """Extra layer-spec hooks (fused ops) from other flag groups."""
    fused_cross_entropy: bool = False
    """Loss from the final hidden states by the chunked linear cross-entropy (mindspeed_lora.ops)."""
    args: dict = field(default_factory=dict)
    """The parsed flags as plain data, stored in checkpoints."""
    notes: list[str] = field(default_factory=list)
    """Startup notes: MindSpeed-LLM flags given that take no effect here."""
    deterministic: bool = False
    """--deterministic-mode: deterministic kernels and collectives (Accelerator.use_deterministic_algorithms)."""


def plain_args(args: argparse.Namespace) -> dict:
    """The flags as JSON-like data (what a weights_only checkpoint may hold)."""
    def plain(v):
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return str(v)

    return {k: plain(v) for k, v in sorted(vars(args).items())}


def _check_compat(args: argparse.Namespace) -> None:
    if args.stage != "sft":
        raise UserError(f"--stage {args.stage}: the SFT trainer's config takes --stage sft (posttrain_gpt.py "
                        "routes dpo to mindspeed_lora.dpo)")
    if args.transformer_impl == "transformer_engine":
        raise UserError("--transformer-impl transformer_engine: not supported; layers come from this project's "
                        "spec (use --transformer-impl local, the default)")
    if args.bf16 and args.fp16:
        raise UserError("give --bf16 or --fp16, not both")
    if args.data_path is None:
        raise UserError("--data-path is required (the --output-prefix of preprocess_data.py)")
    if len(args.data_path) > 1:
        raise UserError(f"--data-path {' '.join(args.data_path)}: one prefix expected; blending several "
                        "datasets is not supported")
    if args.load is None:
        raise UserError("--load is required: a converted Megatron checkpoint or an HF model directory")
    if args.global_batch_size is None:
        raise UserError("--global-batch-size is required")
    if args.lora_fusion and not args.lora_target_modules:
        raise UserError("--lora-fusion needs LoRA (--lora-target-modules)")
    if args.loraplus_lr_ratio is not None and not args.lora_target_modules:
        raise UserError("--loraplus-lr-ratio needs LoRA (--lora-target-modules)")
    if args.lora_fusion and args.overlap_param_gather:
        raise UserError("--lora-fusion with --overlap-param-gather is not supported (untested together: CCLoRA "
                        "reads the adapter weights inside its fused matmuls); drop one of them")


def _lora_config(args: argparse.Namespace):
    if not args.lora_target_modules:
        if args.lora_load:
            raise UserError("--lora-load needs --lora-target-modules (and the --lora-r / --lora-alpha it was "
                            "trained with)")
        return None
    try:
        from mindspeed_lora.lora import lora_config_from_args
    except ImportError as e:
        raise UserError(f"LoRA is not available in this build ({e})") from e
    return lora_config_from_args(args)


def _fused_spec_hooks(args: argparse.Namespace) -> list:
    """The fused-ops layer-spec hook (--use-fused-rmsnorm, --use-flash-attn, ...), when that group exists."""
    if not hasattr(args, "use_flash_attn"):
        return []
    from mindspeed_lora.arguments.fused_ops import fused_ops_config
    from mindspeed_lora.ops.spec import fused_ops_spec_hook

    cfg = fused_ops_config(args)
    return [fused_ops_spec_hook(cfg)] if cfg.enabled else []


def _fused_cross_entropy(args: argparse.Namespace) -> bool:
    if not hasattr(args, "use_fused_linear_cross_entropy"):
        return False
    from mindspeed_lora.arguments.fused_ops import fused_linear_cross_entropy_enabled

    return fused_linear_cross_entropy_enabled(args)


def _family(model_type_hf: str | None) -> str | None:
    if model_type_hf is None:
        return None
    from mindspeed_lora.arguments.convert import MODEL_TYPE_ALIASES
    from mindspeed_lora.models.family import get_family

    try:
        return get_family(MODEL_TYPE_ALIASES.get(model_type_hf, model_type_hf)).name
    except UserError as e:
        raise UserError(f"--model-type-hf: {e}") from None


def training_config_from_args(args: argparse.Namespace) -> TrainingConfig:
    _check_compat(args)
    notes = mindspeed_llm_notes(args)
    granularity = "selective" if args.recompute_activations and args.recompute_granularity is None \
        else args.recompute_granularity
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    model = ModelSetup(
        load=args.load,
        arch_overrides={field_: getattr(args, flag) for flag, field_ in ARCH_FLAGS.items()
                        if getattr(args, flag) is not None},
        untie_embeddings=args.untie_embeddings_and_output_weights,
        require_qk_layernorm=args.qk_layernorm,
        require_qkv_bias=args.add_qkv_bias,
        family=_family(args.model_type_hf),
        rope_scaling=rope_scaling_flags(args),
        params_dtype=dtype,
        recompute_granularity=granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        neftune_noise_alpha=args.neftune_noise_alpha,
    )
    parallel = ParallelOptions(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        num_layer_list=parse_num_layer_list(args.num_layer_list),
    )
    for flag, v in (("--tensor-model-parallel-size", parallel.tensor_model_parallel_size),
                    ("--pipeline-model-parallel-size", parallel.pipeline_model_parallel_size)):
        if v < 1:
            raise UserError(f"{flag} {v}: expected a positive number")
    data = DataSetup(
        data_path=args.data_path[0],
        seq_length=args.seq_length,
        split=args.split,
        pad_to_seq_length=not (args.variable_seq_lengths or args.no_pad_to_seq_lengths),
        neat_pack=args.neat_pack,
        reset_attention=args.reset_attention_mask or args.reset_position_ids,
        seed=args.seed,
        shuffle=not args.no_shuffle,
        tokenizer=args.tokenizer_name_or_path,
    )
    batch = BatchSetup(
        micro_batch_size=args.micro_batch_size,
        global_batch_size=args.global_batch_size,
        train_iters=args.train_iters,
        train_epochs=args.train_epochs,
        calculate_per_token_loss=args.calculate_per_token_loss,
    )
    optim = OptimSetup(
        lr=args.lr, optimizer=args.optimizer, min_lr=args.min_lr, lr_decay_style=args.lr_decay_style,
        lr_decay_iters=args.lr_decay_iters, lr_warmup_fraction=args.lr_warmup_fraction,
        lr_warmup_iters=args.lr_warmup_iters, lr_warmup_init=args.lr_warmup_init, weight_decay=args.weight_decay,
        clip_grad=args.clip_grad, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        sgd_momentum=args.sgd_momentum, initial_loss_scale=args.initial_loss_scale, loss_scale=args.loss_scale,
        use_distributed_optimizer=args.use_distributed_optimizer, overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather, lora_b_lr_ratio=args.loraplus_lr_ratio,
    )
    checkpoint = CheckpointSetup(
        save=args.save, save_interval=args.save_interval, save_optim=not args.no_save_optim,
        save_rng=not args.no_save_rng, load_optim=not args.no_load_optim, load_rng=not args.no_load_rng,
        finetune=args.finetune, lora_load=args.lora_load, ckpt_step=args.ckpt_step,
        exit_signal=args.exit_signal if args.exit_signal_handler else None, exit_interval=args.exit_interval,
        exit_duration_mins=args.exit_duration_in_mins,
    )
    logging = LoggingSetup(
        log_interval=args.log_interval, eval_interval=args.eval_interval, eval_iters=args.eval_iters,
        tensorboard_dir=args.tensorboard_dir, loss_curve=args.loss_curve, profile=args.profile,
        profile_step_start=args.profile_step_start, profile_step_end=args.profile_step_end,
        profile_ranks=tuple(args.profile_ranks), profile_save_path=args.profile_save_path,
        profile_record_shapes=args.profile_record_shapes, profile_with_memory=args.profile_with_memory,
        manual_gc=args.manual_gc, manual_gc_interval=args.manual_gc_interval, manual_gc_eval=args.manual_gc_eval,
    )
    return TrainingConfig(
        model=model, parallel=parallel, data=data, batch=batch, optim=optim, checkpoint=checkpoint,
        logging=logging, seed=args.seed, lora=_lora_config(args), lora_fusion=args.lora_fusion,
        spec_hooks=_fused_spec_hooks(args), fused_cross_entropy=_fused_cross_entropy(args), args=plain_args(args),
        notes=notes, deterministic=args.deterministic_mode,
    )
