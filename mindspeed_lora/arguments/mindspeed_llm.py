"""MindSpeed-LLM training flags that exist for features this project does not have, sorted by what taking
them would mean, so that MindSpeed-LLM's scripts run unchanged without any flag being silently dropped:

- ``NO_EFFECT``: optimizations (speed or memory only) and logging options not implemented here. Accepted; each
  one given is named in a note at startup, since results are the same without them.
- ``MUST_BE_OFF``: features that change what is trained (context parallelism, virtual pipeline stages, MoE,
  QLoRA, ...). Accepted at their off value; any other value is refused with what to do instead.
- the rest are checked where they are used: ``--model-type-hf`` and the rope-scaling flags against the model
  (``training.model.resolve_arch``), ``--is-pairwise-dataset`` against ``--stage`` (``training.run_from_args``).
"""
from __future__ import annotations

import argparse

from mindspeed_lora.errors import UserError

# flag -> (argparse kwargs, what the note says it would have done)
NO_EFFECT = {
    "--use-mc2": ({"action": "store_true"}, "fused matmul + collective for the tensor-parallel linears"),
    "--use-ascend-mc2": ({"action": "store_true"}, "fused matmul + collective for the tensor-parallel linears"),
    "--use-ascend-coc": ({"action": "store_true"}, "compute-communication overlap for the tensor-parallel linears"),
    "--reuse-fp32-param": ({"action": "store_true"}, "sharing fp32 master weights with the bf16 params"),
    "--swap-attention": ({"action": "store_true"}, "offloading attention activations to host memory"),
    "--recompute-activation-function": ({"action": "store_true"}, "recomputing the MLP activation"),
    "--recompute-activation-function-num-layers": ({"type": int}, "recomputing the MLP activation"),
    "--recompute-norm": ({"action": "store_true"}, "recomputing the norms"),
    "--recompute-norm-num-layers": ({"type": int}, "recomputing the norms"),
    "--use-fused-ring-attention-update": ({"action": "store_true"}, "a fused context-parallel attention update"),
    "--jit-compile": ({"action": "store_true"}, "NPU graph compilation"),
    "--gemm-gradient-accumulation-fusion": ({"action": "store_true"}, "fused weight-gradient accumulation"),
    "--num-workers": ({"type": int}, "data-loader worker processes (samples are read from memory maps here)"),
    "--log-timers-to-tensorboard": ({"action": "store_true"}, "timer scalars in TensorBoard"),
    "--tensorboard-log-interval": ({"type": int}, "a TensorBoard interval apart from --log-interval"),
    "--log-validation-ppl-to-tensorboard": ({"action": "store_true"},
                                            "validation perplexity scalars (the log line has it)"),
    "--profile-level": ({}, "the NPU profiler's level (torch_npu's default level is used)"),
    "--profile-with-cpu": ({"action": "store_true"}, "a CPU-activity switch (CPU activity is always traced)"),
    "--profile-with-stack": ({"action": "store_true"}, "Python stacks in the profile"),
    "--profile-export-type": ({}, "the profiler's export format (Chrome trace + operator table here)"),
    "--profile-data-simplification": ({"action": "store_true"}, "the NPU profiler's data simplification"),
    "--shape-order": ({}, "the attention tensor layout (chosen per device and op here)"),
    "--cp-window-size": ({"type": int}, "double-ring context-parallel attention"),
    "--use-cp-send-recv-overlap": ({"action": "store_true"}, "context-parallel send/recv overlap"),
    "--wandb-project": ({}, "Weights & Biases logging (scalars go to --tensorboard-dir)"),
    "--wandb-exp-name": ({}, "Weights & Biases logging (scalars go to --tensorboard-dir)"),
    "--wandb-save-dir": ({}, "Weights & Biases logging (scalars go to --tensorboard-dir)"),
    "--handler-name": ({}, "preprocessing: --data-path must be preprocess_data.py's output, made with it"),
    "--workers": ({"type": int}, "preprocessing: --data-path must be preprocess_data.py's output, made with it"),
    "--pack": ({"action": "store_true"},
               "preprocessing: --data-path must be preprocess_data.py's output, made with it"),
}

# flag -> (argparse kwargs, the off value, why anything else is refused)
MUST_BE_OFF = {
    "--context-parallel-size": ({"type": int, "default": 1}, 1,
                                "context parallelism is not supported; long sequences train with "
                                "--recompute-granularity full, or tensor parallelism with --sequence-parallel"),
    "--num-layers-per-virtual-pipeline-stage": ({"type": int}, None,
                                                "virtual pipeline stages are not supported; drop the flag "
                                                "(plain pipeline stages, --num-layer-list for uneven ones)"),
    "--virtual-pipeline-model-parallel-size": ({"type": int}, None,
                                               "virtual pipeline stages are not supported; drop the flag"),
    "--sliding-window": ({"type": int}, None, "sliding-window attention is not supported"),
    "--noop-layers": ({}, None, "no-op layers are not supported"),
    "--qlora": ({"action": "store_true"}, False, "QLoRA (a quantized base) is not supported; LoRA on a bf16 base"),
    "--lora-modules-to-save": ({"nargs": "+"}, None,
                               "training whole modules beside the adapters is not supported; LoRA trains "
                               "--lora-target-modules only"),
    "--padded-samples": ({"action": "store_true"}, False,
                         "padding the last epoch with samples from the start is not supported (each epoch is "
                         "one shuffled pass here; the last global batch of a pass continues into the next)"),
    "--output-layer-slice-num": ({"type": int, "default": 1}, 1, "a sliced output layer is not supported"),
    "--o2-optimizer": ({"action": "store_true"}, False,
                       "bf16 optimizer states are not supported (they change the numbers); Adam keeps fp32"),
    "--o2-gradient": ({"action": "store_true"}, False,
                      "bf16 gradient accumulation is not supported (it changes the numbers)"),
    "--num-experts": ({"type": int}, None, "mixture-of-experts models are not supported (dense models only)"),
    "--no-check-for-nan-in-loss-and-grad": ({"action": "store_true"}, False,
                                            "the NaN/inf check is always on: a non-finite loss stops the run "
                                            "before the weights change, and the last checkpoint stays the latest"),
    "--lu-lora-final-layer-index": ({"type": int}, None, "LU-LoRA is not supported; plain LoRA on all layers"),
    "--lu-lora-lr": ({"type": float}, None, "LU-LoRA is not supported; plain LoRA on all layers"),
    "--lu-lora-lr-ratio": ({"type": float}, None, "LU-LoRA is not supported; plain LoRA on all layers"),
    "--moe-grouped-gemm": ({"action": "store_true"}, False,
                           "mixture-of-experts models are not supported (dense models only)"),
}

ROPE_SCALING_FLAGS = {  # flag -> key of the HF config's rope_scaling
    "--rope-scaling-type": "rope_type",
    "--rope-scaling-factor": "factor",
    "--low-freq-factor": "low_freq_factor",
    "--high-freq-factor": "high_freq_factor",
    "--rope-scaling-original-max-position-embeddings": "original_max_position_embeddings",
    "--rope-scaling-beta-fast": "beta_fast",
    "--rope-scaling-beta-slow": "beta_slow",
    "--rope-scaling-mscale": "mscale",
    "--rope-scaling-mscale-all-dim": "mscale_all_dim",
}


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def add_mindspeed_llm_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "MindSpeed-LLM features not here (accepted so its scripts run: optimizations and logging options take no "
        "effect and are named at startup; features that change training must be off)")
    for flag, (kwargs, does) in NO_EFFECT.items():
        g.add_argument(flag, **kwargs, help=f"no effect here ({does})")
    for flag, (kwargs, off, why) in MUST_BE_OFF.items():
        g.add_argument(flag, **kwargs, help=f"must be {off}: {why}")
    g.add_argument("--context-parallel-algo", default=None,
                   help="no effect: context parallelism is refused (--context-parallel-size must be 1)")
    g.add_argument("--cp-attention-mask-type", choices=["causal", "general"], default=None,
                   help="no effect: context parallelism is refused (--context-parallel-size must be 1)")
    g.add_argument("--attention-mask-type", choices=["causal", "general"], default=None,
                   help="accepted: the mask follows the data (causal, or per-segment with --reset-attention-mask)")
    g.add_argument("--full-shuffle-instruction-dataset", action="store_true",
                   help="always on: each epoch is one permutation of all training samples")
    g.add_argument("--enable-hf2mg-convert", action="store_true",
                   help="always on: --load may be an HF model directory, converted while loading")
    g.add_argument("--model-type-hf", default=None,
                   help="checked: the model family of --load (qwen3, llama3, qwen2, mistral; llama2 means Llama)")
    g.add_argument("--tokenizer-padding-side", choices=["right"], default="right",
                   help="always right in training (the loss mask follows the data)")
    g.add_argument("--is-pairwise-dataset", action="store_true", help="checked: pairwise data is --stage dpo")


def add_model_compat_args(parser: argparse.ArgumentParser) -> None:
    """MindSpeed-LLM's model-description flags that the checkpoint already fixes (training and inference)."""
    g = parser.add_argument_group("MindSpeed-LLM model flags the checkpoint fixes (checked against it)")
    g.add_argument("--rope-scaling-type", default=None, help="checked against the checkpoint's rope_scaling")
    for flag in list(ROPE_SCALING_FLAGS)[1:]:
        g.add_argument(flag, type=float, default=None, help="checked against the checkpoint's rope_scaling")
    g.add_argument("--original-max-position-embeddings", type=float, default=None,
                   help="MindSpeed-LLM's name of --rope-scaling-original-max-position-embeddings")
    g.add_argument("--rotary-percent", type=float, default=1.0, help="must be 1.0: rotary embedding on all of "
                   "each head (partial rotary is not supported)")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="accepted: the tokenizer's vocabulary; the embedding size is the checkpoint's "
                        "(--padded-vocab-size checks it)")


def mindspeed_llm_notes(args: argparse.Namespace) -> list[str]:
    """Notes for the no-effect flags given; a UserError for a feature flag that is not off."""
    for flag, (_, off, why) in MUST_BE_OFF.items():
        value = getattr(args, _dest(flag))
        if value != off and not (off is False and value is None):
            raise UserError(f"{flag} {value}: {why}")
    notes = []
    for flag, (_, does) in NO_EFFECT.items():
        value = getattr(args, _dest(flag))
        if value not in (None, False):
            notes.append(f"{flag}: not implemented here, no effect ({does})")
    return notes


def rope_scaling_flags(args: argparse.Namespace) -> dict:
    """{rope_scaling key: value} of the rope-scaling flags given; refuses partial rotary embeddings."""
    if args.rotary_percent != 1.0:
        raise UserError(f"--rotary-percent {args.rotary_percent}: partial rotary embeddings are not supported "
                        "(the checkpoint's families rotate whole heads)")
    given = {key: getattr(args, _dest(flag)) for flag, key in ROPE_SCALING_FLAGS.items()
             if getattr(args, _dest(flag)) is not None}
    original = args.original_max_position_embeddings
    if original is not None:
        if given.get("original_max_position_embeddings", original) != original:
            raise UserError(f"--original-max-position-embeddings {original:g} and "
                            "--rope-scaling-original-max-position-embeddings "
                            f"{given['original_max_position_embeddings']:g} disagree")
        given["original_max_position_embeddings"] = original
    return given
