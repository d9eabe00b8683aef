"""convert_ckpt.py flags (MindSpeed-LLM's names) and the typed ``ConvertConfig`` built from them."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from mindspeed_lora.arguments.common import add_lora_args, parse_num_layer_list
from mindspeed_lora.errors import UserError

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16",
           "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
# MindSpeed-LLM's --model-type-hf names for the families we convert; its scripts use llama2 for every Llama
# (and for Qwen2.5, whose architecture then comes from config.json anyway)
MODEL_TYPE_ALIASES = {"llama2": "llama3", "llama": "llama3"}


def add_convert_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("checkpoint conversion")
    g.add_argument("--use-mcore-models", action="store_true",
                   help="accepted for MindSpeed-LLM scripts: checkpoints are always megatron-core (mcore) models")
    g.add_argument("--model-type", default="GPT", choices=["GPT"], help="model class; only GPT")
    g.add_argument("--add-qkv-bias", action="store_true",
                   help="accepted for MindSpeed-LLM scripts, checked: the model must have q/k/v biases (Qwen2)")
    g.add_argument("--spec", nargs="*", default=None,
                   help="accepted for MindSpeed-LLM scripts: the layer layout comes from the model family")
    g.add_argument("--load-model-type", default="hf", choices=["hf", "mg"],
                   help="what --load-dir holds: an HF model (or PEFT adapter) dir, or a Megatron checkpoint")
    g.add_argument("--save-model-type", default="mg", choices=["hf", "mg"], help="what to write to --save-dir")
    g.add_argument("--load-dir", required=True, help="source directory")
    g.add_argument("--save-dir", required=True,
                   help="output directory (must be new or empty unless --overwrite-save-dir); for mg -> hf into "
                        "an existing HF model dir, the output goes to its mg2hf/ subdir as MindSpeed-LLM does")
    g.add_argument("--model-type-hf", default=None,
                   help="model family (qwen3, llama3, qwen2, mistral; llama2 is accepted as MindSpeed-LLM's name for "
                        "Llama); detected from config.json when omitted")
    g.add_argument("--target-tensor-parallel-size", type=int, default=1, help="TP size of a Megatron output")
    g.add_argument("--target-pipeline-parallel-size", type=int, default=1, help="PP size of a Megatron output")
    g.add_argument("--target-expert-parallel-size", type=int, default=1,
                   help="accepted for MindSpeed-LLM scripts; only 1 (dense models)")
    g.add_argument("--num-layer-list", default=None,
                   help="comma-separated decoder layers per pipeline stage of a Megatron output, e.g. 3,5")
    g.add_argument("--params-dtype", default=None, choices=sorted(_DTYPES),
                   help="dtype of the written weights; default: the source's (the HF config's dtype, or the "
                        "Megatron checkpoint's), never a silent fp16")
    g.add_argument("--save-lora-to-hf", action="store_true",
                   help="mg -> hf: write the LoRA adapter (from --lora-load, else --load-dir) as a PEFT adapter "
                        "dir instead of a merged model")
    g.add_argument("--test-convert-precision", action="store_true",
                   help="after converting, compare HF and megatron-core logits in fp32 on a fixed probe (for "
                        "--save-lora-to-hf: peft over the HF base with the written adapter); exit non-zero (and "
                        "publish nothing) when the mean |diff| exceeds --precision-threshold")
    g.add_argument("--precision-threshold", type=float, default=0.1,
                   help="largest mean |logit diff| --test-convert-precision accepts (Megatron-SWIFT's 0.1)")
    g.add_argument("--hf-cfg-dir", default=None,
                   help="HF dir with config.json and tokenizer files, where the checkpoint has no hf_config/ "
                        "(mg -> hf); the HF model a MindSpeed-LLM / Megatron-LM checkpoint (no mindspeed_lora.json) "
                        "was converted from (mg -> hf, mg -> mg); or the base model of a PEFT adapter (hf -> mg)")
    g.add_argument("--tokenizer-model", default=None,
                   help="tokenizer file or dir (MindSpeed-LLM's flag); its directory's tokenizer files are "
                        "copied instead of the source's")
    g.add_argument("--max-shard-size", default="5GB", help="largest safetensors file of an HF output")
    g.add_argument("--overwrite-save-dir", action="store_true",
                   help="replace a non-empty --save-dir (the old one is removed only once the new one is complete)")
    g.add_argument("--load-checkpoint-loosely", action="store_true",
                   help="accepted for MindSpeed-LLM scripts; keys are always checked exactly")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_lora_args(parser)


@dataclass
class ConvertConfig:
    load_model_type: str
    save_model_type: str
    load_dir: str
    save_dir: str
    model_type_hf: str | None = None
    """Family name (aliases resolved); None: from the source's config."""
    target_tp: int = 1
    target_pp: int = 1
    num_layer_list: list[int] | None = None
    params_dtype: str | None = None
    """float32 / bfloat16 / float16; None keeps the source's dtype."""
    save_lora_to_hf: bool = False
    test_precision: bool = False
    precision_threshold: float = 0.1
    hf_cfg_dir: str | None = None
    tokenizer_dir: str | None = None
    max_shard_size: int = 5 * 10**9
    overwrite: bool = False
    progress: bool = True
    lora_load: str | None = None
    lora_flags: dict | None = None
    """{"r", "alpha", "target_modules", "dropout", "use_rslora"} when --lora-target-modules is given: what the
    LoRA checkpoint or adapter must match."""
    model_type_hf_generic: bool = False
    """--model-type-hf was MindSpeed-LLM's generic llama2, which its scripts also pass for other families:
    config.json decides then."""
    require_qkv_bias: bool = False
    """--add-qkv-bias: the model must have q/k/v biases."""

    def __post_init__(self):
        if self.target_tp < 1 or self.target_pp < 1:
            raise UserError(f"--target-tensor-parallel-size {self.target_tp} / --target-pipeline-parallel-size "
                            f"{self.target_pp}: expected >= 1")
        if self.load_model_type == "hf" and self.save_model_type == "hf":
            raise UserError("--load-model-type hf --save-model-type hf: nothing to convert")
        if self.save_lora_to_hf and (self.load_model_type, self.save_model_type) != ("mg", "hf"):
            raise UserError("--save-lora-to-hf needs --load-model-type mg --save-model-type hf")
        if self.lora_load and (self.load_model_type, self.save_model_type) != ("mg", "hf"):
            raise UserError("--lora-load is read by mg -> hf (merge, or --save-lora-to-hf); to import a PEFT "
                            "adapter, give its directory as --load-dir with --load-model-type hf")
        if self.precision_threshold <= 0:
            raise UserError(f"--precision-threshold {self.precision_threshold}: expected > 0")
        if os.path.realpath(self.save_dir) == os.path.realpath(self.load_dir):
            raise UserError(f"--save-dir {self.save_dir} is --load-dir: write the conversion somewhere else")
        for what, path in (("--load-dir", self.load_dir), ("--lora-load", self.lora_load),
                           ("--hf-cfg-dir", self.hf_cfg_dir), ("--tokenizer-model", self.tokenizer_dir)):
            if path is not None and not os.path.isdir(path):
                raise UserError(f"{what} {path}: no such directory")


def convert_config_from_args(args: argparse.Namespace) -> ConvertConfig:
    from mindspeed_lora.checkpoint.hf_writer import parse_size
    from mindspeed_lora.models.family import get_family

    if args.target_expert_parallel_size != 1:
        raise UserError(f"--target-expert-parallel-size {args.target_expert_parallel_size}: only dense models "
                        "convert (expected 1)")
    family = None
    if args.model_type_hf is not None:
        family = get_family(MODEL_TYPE_ALIASES.get(args.model_type_hf, args.model_type_hf)).name
    tokenizer_dir = None
    if args.tokenizer_model is not None:
        tokenizer_dir = args.tokenizer_model if os.path.isdir(args.tokenizer_model) \
            else os.path.dirname(os.path.abspath(args.tokenizer_model))
    try:
        max_shard = parse_size(args.max_shard_size)
    except ValueError as e:
        raise UserError(f"--max-shard-size {args.max_shard_size!r}: expected a size like 5GB or 500MB") from e
    lora_flags = None
    if args.lora_target_modules:
        lora_flags = {"r": args.lora_r, "alpha": args.lora_alpha, "target_modules": list(args.lora_target_modules),
                      "dropout": args.lora_dropout, "use_rslora": args.lora_use_rslora}
    return ConvertConfig(
        load_model_type=args.load_model_type, save_model_type=args.save_model_type, load_dir=args.load_dir,
        save_dir=args.save_dir, model_type_hf=family, target_tp=args.target_tensor_parallel_size,
        target_pp=args.target_pipeline_parallel_size, num_layer_list=parse_num_layer_list(args.num_layer_list),
        params_dtype=_DTYPES[args.params_dtype] if args.params_dtype else None,
        save_lora_to_hf=args.save_lora_to_hf, test_precision=args.test_convert_precision,
        precision_threshold=args.precision_threshold, hf_cfg_dir=args.hf_cfg_dir, tokenizer_dir=tokenizer_dir,
        max_shard_size=max_shard, overwrite=args.overwrite_save_dir, progress=not args.no_progress,
        lora_load=args.lora_load, lora_flags=lora_flags,
        model_type_hf_generic=args.model_type_hf in MODEL_TYPE_ALIASES, require_qkv_bias=args.add_qkv_bias,
    )
