"""Flag groups shared by several scripts: tokenizer, prompt template, LoRA, model parallelism."""
from __future__ import annotations

import argparse

LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def str2bool_or_none(v: str):
    v = v.lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    if v == "none":
        return None
    raise argparse.ArgumentTypeError(f"expected true, false or none, got {v!r}")


def add_tokenizer_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", default="PretrainedFromHF", choices=["PretrainedFromHF"],
                   help="tokenizer kind; only HF tokenizers are supported")
    g.add_argument("--tokenizer-name-or-path", default=None, help="HF tokenizer directory")
    g.add_argument("--tokenizer-not-use-fast", action="store_true", help="use the slow HF tokenizer")


def add_prompt_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("prompt template")
    g.add_argument("--prompt-type", default=None, help="chat template name from --prompt-type-path")
    g.add_argument("--prompt-type-path", default=None,
                   help="templates JSON (default: configs/finetune/templates.json of this project)")
    g.add_argument("--enable-thinking", type=str2bool_or_none, default=None,
                   help="reasoning templates: true, false or none")


def add_lora_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    g.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha; scaling = alpha / r")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
    g.add_argument("--lora-target-modules", nargs="*", default=[],
                   help=f"megatron linears to adapt ({' '.join(LORA_TARGETS)}) or all-linear; "
                        "a non-empty list turns LoRA on")
    g.add_argument("--lora-use-rslora", action="store_true", help="scaling = alpha / sqrt(r)")
    g.add_argument("--lora-load", default=None, help="LoRA checkpoint directory to load")
    g.add_argument("--lora-fusion", action="store_true", help="CCLoRA: overlap LoRA with TP communication")
    g.add_argument("--lora-ckpt-filter", action="store_true",
                   help="save only LoRA weights (always on for LoRA runs; accepted for MindSpeed-LLM scripts)")


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layer-list", type=str, default=None,
                   help="comma-separated decoder layers per pipeline stage, e.g. 3,5 (uneven PP)")
    g.add_argument("--sequence-parallel", action="store_true")


def parse_num_layer_list(value: str | None) -> list[int] | None:
    from mindspeed_lora.errors import UserError

    if value is None:
        return None
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError as e:
        raise UserError(f"--num-layer-list {value!r}: expected comma-separated integers") from e
