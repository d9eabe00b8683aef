"""Flags of posttrain_gpt.py (MindSpeed-LLM names): model, data, batch, optimiser, schedule, checkpoints, logs.

Architecture flags default to None: the architecture comes from the checkpoint (``mindspeed_lora.json``
written by convert_ckpt.py, or an HF config.json) and a flag given on the command line overrides it.
A group of MindSpeed-LLM flags describes what this project always does (``--swiglu``, ``--use-mcore-models``,
...); they are accepted so existing scripts run unchanged, and checked against the architecture where they
could disagree with it.
"""
from __future__ import annotations

import argparse
import importlib.util

from mindspeed_lora.arguments.common import add_lora_args, add_parallel_args, add_prompt_args, add_tokenizer_args
from mindspeed_lora.arguments.dpo import add_dpo_args
from mindspeed_lora.arguments.mindspeed_llm import add_mindspeed_llm_args

EXIT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")

STAGES = ("sft", "dpo", "simpo")


def add_training_args(parser: argparse.ArgumentParser) -> None:
    add_stage_args(parser)
    add_tokenizer_args(parser)
    add_prompt_args(parser)
    add_model_args(parser)
    add_data_args(parser)
    add_parallel_args(parser)
    add_recompute_args(parser)
    add_batch_args(parser)
    add_optimizer_args(parser)
    add_checkpoint_args(parser)
    add_logging_args(parser)
    add_lora_args(parser)
    add_compat_args(parser)
    add_mindspeed_llm_args(parser)
    add_dpo_args(parser)
    if importlib.util.find_spec("mindspeed_lora.arguments.fused_ops") is not None:
        from mindspeed_lora.arguments.fused_ops import add_fused_ops_args

        add_fused_ops_args(parser)


def add_stage_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("post-training stage")
    g.add_argument("--stage", default="sft", choices=STAGES,
                   help="post-training task: sft, dpo, or simpo (MindSpeed-LLM's former SimPO stage: --stage dpo "
                        "--dpo-loss-type simpo with --simpo-beta and --gamma-beta-ratio)")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model (architecture read from --load; a flag given here overrides it)")
    g.add_argument("--load", default=None,
                   help="converted Megatron checkpoint (convert_ckpt.py), a training checkpoint to resume, "
                        "or an HF model directory (sharded in memory, no offline step)")
    g.add_argument("--ckpt-step", type=int, default=None, metavar="N",
                   help="read iteration N of the Megatron checkpoint instead of its latest (Megatron-LM's flag): of "
                        "--lora-load when given, else of --load. Training resumes from that iteration (its counter, "
                        "data position, optimizer and RNG state), or with --finetune takes its weights only")
    g.add_argument("--num-layers", type=int, default=None, help="decoder layers")
    g.add_argument("--hidden-size", type=int, default=None)
    g.add_argument("--ffn-hidden-size", type=int, default=None)
    g.add_argument("--num-attention-heads", type=int, default=None)
    g.add_argument("--num-query-groups", type=int, default=None, help="key/value heads (GQA)")
    g.add_argument("--group-query-attention", action="store_true",
                   help="accepted for MindSpeed-LLM scripts; GQA follows --num-query-groups / the checkpoint")
    g.add_argument("--kv-channels", type=int, default=None, help="head dimension")
    g.add_argument("--max-position-embeddings", type=int, default=None)
    g.add_argument("--padded-vocab-size", type=int, default=None, help="vocabulary size of the embedding")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                   help="accepted for MindSpeed-LLM scripts; the vocabulary is the checkpoint's (or "
                        "--padded-vocab-size) and must divide by the TP size")
    g.add_argument("--norm-epsilon", type=float, default=None)
    g.add_argument("--rotary-base", type=float, default=None, help="rope theta")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                   help="the output layer has its own weight; refused for a tied checkpoint")
    g.add_argument("--qk-layernorm", action="store_true", help="must match the model family (Qwen3)")
    g.add_argument("--add-qkv-bias", action="store_true", help="must match the model family (Qwen2)")
    g.add_argument("--init-method-std", type=float, default=0.02, help="std of weights created here (LoRA B=0)")
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--bf16", action="store_true", help="bf16 weights and activations, fp32 optimizer state")
    g.add_argument("--fp16", action="store_true", help="fp16 with dynamic loss scaling")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="output prefix of preprocess_data.py ({prefix}_packed_input_ids_document.bin/.idx ...)")
    g.add_argument("--is-instruction-dataset", action="store_true",
                   help="instruction (SFT) data; the only kind --stage sft reads, so this is implied")
    g.add_argument("--split", default="100,0,0",
                   help="train,valid,test weights over the samples, e.g. 98,2,0 (valid feeds --eval-iters)")
    g.add_argument("--seq-length", type=int, default=None, help="longest sample; batches pad to it by default")
    g.add_argument("--variable-seq-lengths", action="store_true",
                   help="pad each micro-batch to its longest sample rounded up to a multiple of 8")
    g.add_argument("--no-pad-to-seq-lengths", action="store_true", help="same as --variable-seq-lengths")
    g.add_argument("--neat-pack", action="store_true",
                   help="packed data with segment ids in attention_mask: no attention across samples, "
                        "positions restart per sample")
    g.add_argument("--reset-attention-mask", action="store_true",
                   help="packed data: no attention across packed samples (segments from neat-pack ids, or "
                        "split after each end-of-document token)")
    g.add_argument("--reset-position-ids", action="store_true",
                   help="positions restart per packed sample (implied by --reset-attention-mask / --neat-pack)")


def add_recompute_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("activation recomputation")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    g.add_argument("--recompute-method", choices=["uniform", "block", "split"], default=None,
                   help="full recompute: uniform chunks of --recompute-num-layers, the first "
                        "--recompute-num-layers layers of each stage (block), or every layer as two halves "
                        "whose recomputation skips the LoRA output projections' base GEMMs (split: one more "
                        "hidden-size activation per layer kept)")
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--recompute-activations", action="store_true", help="same as --recompute-granularity selective")


def add_batch_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("batches and iterations")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="samples per optimizer step (gradient accumulation = global / (micro x data-parallel))")
    g.add_argument("--train-iters", type=int, default=None, help="optimizer steps (or give --train-epochs)")
    g.add_argument("--train-epochs", type=float, default=None,
                   help="passes over the training split; sets --train-iters from the dataset size")
    g.add_argument("--seed", type=int, default=1234, help="weights created here, dropout and data shuffling")
    g.add_argument("--no-shuffle", action="store_true", help="read training samples in file order")
    g.add_argument("--calculate-per-token-loss", action="store_true",
                   help="average the loss over all target tokens of the global batch (default: per micro-batch "
                        "mean, averaged over micro-batches, as Megatron/MindSpeed-LLM do)")


def add_optimizer_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("optimizer and learning-rate schedule")
    g.add_argument("--optimizer", choices=["adam", "sgd"], default="adam", help="adam is AdamW (decoupled decay)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--neftune-noise-alpha", type=float, default=0.0,
                   help="NEFTune: uniform noise of half-width alpha/sqrt(L*hidden) on the embeddings while training "
                        "(LLaMA-Factory's neftune_noise_alpha; 5 is common); 0 is off")
    g.add_argument("--loraplus-lr-ratio", type=float, default=None,
                   help="LoRA+: the adapters' B matrices learn at this multiple of --lr and --min-lr (LLaMA-Factory's "
                        "loraplus_lr_ratio; 16 is the paper's suggestion)")
    g.add_argument("--lr-decay-style", choices=["cosine", "linear", "constant", "inverse-square-root"],
                   default="linear")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--lr-warmup-fraction", type=float, default=None, help="warmup as a fraction of decay iters")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-init", type=float, default=0.0, help="learning rate at the start of warmup")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0, help="max global grad norm; 0 disables clipping")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--sgd-momentum", type=float, default=0.9)
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32, help="fp16 dynamic loss scale start")
    g.add_argument("--loss-scale", type=float, default=None, help="fp16 static loss scale")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard optimizer state over data-parallel ranks (ZeRO-1)")
    g.add_argument("--overlap-grad-reduce", action="store_true", help="overlap DP grad reduction with backward")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="overlap the distributed optimizer's param all-gather with forward")


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("checkpoints")
    g.add_argument("--save", default=None, help="directory for training checkpoints")
    g.add_argument("--save-interval", type=int, default=None, help="save every N iterations (and at the end)")
    g.add_argument("--no-save-optim", action="store_true", help="save weights without optimizer state")
    g.add_argument("--no-save-rng", action="store_true", help="save without RNG states")
    g.add_argument("--no-load-optim", action="store_true", help="resume weights, fresh optimizer state")
    g.add_argument("--no-load-rng", action="store_true", help="resume without restoring RNG states")
    g.add_argument("--finetune", action="store_true",
                   help="load weights only and start at iteration 0 (no optimizer, scheduler or data position)")
    g.add_argument("--deterministic-mode", "--npu-deterministic", "--use-deter-comp", action="store_true",
                   dest="deterministic_mode",
                   help="bitwise-repeatable runs: deterministic kernels, and deterministic collectives "
                        "(HCCL_DETERMINISTIC on NPU; a fixed cuBLAS workspace and NCCL's ring algorithm on GPU); "
                        "Megatron-LM's name, MindSpeed-LLM's two names")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on --exit-signal (a scheduler's warning before preemption or its time limit), finish the "
                        "iteration, save a checkpoint (with --save) and exit 0; all ranks stop at the same iteration")
    g.add_argument("--exit-signal", default="SIGTERM", choices=EXIT_SIGNALS,
                   help="the signal --exit-signal-handler waits for")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="save (with --save) and exit after the first iteration divisible by N")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save (with --save) and exit after the first iteration that ends this many minutes after "
                        "training started (the slowest rank's clock)")


def add_logging_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--eval-interval", type=int, default=None, help="validation every N iterations")
    g.add_argument("--eval-iters", type=int, default=0, help="global batches per validation")
    g.add_argument("--tensorboard-dir", default=None, help="write TensorBoard scalars here")
    g.add_argument("--loss-curve", default=None,
                   help="loss-curve PNG written at the end (default: loss_curve.png in --save, else in "
                        "--tensorboard-dir, else in the current directory)")
    g.add_argument("--profile", action="store_true",
                   help="profile iterations [--profile-step-start, --profile-step-end) with torch.profiler "
                        "(torch_npu.profiler on NPUs): a trace and an operator table per profiled rank")
    g.add_argument("--profile-step-start", type=int, default=10, help="first profiled iteration (1-based)")
    g.add_argument("--profile-step-end", type=int, default=12, help="iteration where profiling stops (excluded)")
    g.add_argument("--profile-ranks", type=int, nargs="+", default=[0], help="global ranks to profile")
    g.add_argument("--profile-save-path", default=None,
                   help="where traces go (default: profile/ in --tensorboard-dir, else in the current directory)")
    g.add_argument("--profile-record-shapes", action="store_true", help="record operator input shapes")
    g.add_argument("--profile-with-memory", action="store_true", help="record device memory allocations")
    g.add_argument("--manual-gc", action="store_true",
                   help="Python's threshold garbage collector off during training: the objects built at setup are "
                        "frozen out of collection, and a collection runs only every --manual-gc-interval "
                        "iterations (and around validation), so pauses do not land inside steps at random")
    g.add_argument("--manual-gc-interval", type=int, default=0,
                   help="with --manual-gc: collect every N iterations (0: never between steps)")
    g.add_argument("--no-manual-gc-eval", action="store_false", dest="manual_gc_eval",
                   help="with --manual-gc: no collection at the start and end of each validation")


def add_compat_args(parser: argparse.ArgumentParser) -> None:
    """MindSpeed-LLM flags that name what this project always does; accepted, and checked where they can clash."""
    from mindspeed_lora.arguments.mindspeed_llm import add_model_compat_args

    add_model_compat_args(parser)
    g = parser.add_argument_group("MindSpeed-LLM compatibility (fixed behaviour; accepted for existing scripts)")
    g.add_argument("--use-mcore-models", action="store_true", help="always on: megatron-core GPTModel")
    g.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default="local",
                   help="layers come from this project's spec; transformer_engine is refused")
    g.add_argument("--spec", nargs="*", default=None,
                   help="MindSpeed-LLM layer-spec module; the spec here comes from the model family")
    g.add_argument("--position-embedding-type", choices=["rope"], default="rope")
    g.add_argument("--use-rotary-position-embeddings", action="store_true", help="always on")
    g.add_argument("--normalization", choices=["RMSNorm"], default="RMSNorm")
    g.add_argument("--swiglu", action="store_true", help="always on")
    g.add_argument("--disable-bias-linear", action="store_true", help="always on (q/k/v bias follows the family)")
    g.add_argument("--attention-softmax-in-fp32", action="store_true", help="always on")
    g.add_argument("--no-gradient-accumulation-fusion", action="store_true", help="always on off-CUDA")
    g.add_argument("--no-masked-softmax-fusion", action="store_true", help="always on")
    g.add_argument("--distributed-backend", choices=["nccl", "hccl", "gloo"], default=None,
                   help="the accelerator's backend is used (hccl on NPU, nccl on GPU, gloo on CPU)")
    g.add_argument("--ckpt-format", choices=["torch"], default="torch", help="Megatron legacy torch layout")
    g.add_argument("--exit-on-missing-checkpoint", action="store_true", help="always on: a missing --load fails")
    g.add_argument("--log-throughput", action="store_true", help="always on")
    g.add_argument("--no-shared-storage", action="store_true",
                   help="accepted and ignored: MindSpeed-LLM builds dataset caches per node with it; here every rank "
                        "memory-maps the dataset and orders samples in memory, so nothing is cached. --save still "
                        "needs a filesystem all nodes share (docs/multinode.md)")
    g.add_argument("--check-for-nan-in-loss-and-grad", action="store_true",
                   help="always on: a NaN/inf loss stops the run, the last checkpoint stays the latest")
