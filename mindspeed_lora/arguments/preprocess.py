"""Flags of preprocess_data.py (MindSpeed-LLM names); ``PreprocessConfig.from_args`` reads them."""
from __future__ import annotations

import argparse

from mindspeed_lora.arguments.common import add_prompt_args, add_tokenizer_args


def add_preprocess_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("input / output")
    g.add_argument("--input", default=None,
                   help="a .json, .jsonl, .parquet or .csv file, a directory of them, or a comma-separated list; "
                        "path#N takes N samples of path (chosen with --seed, file order kept)")
    g.add_argument("--output-prefix", default=None,
                   help="outputs are {prefix}_packed_{key}_document.bin/.idx ({prefix}_text_document for "
                        "pretraining text) and {prefix}_summary.json")
    g.add_argument("--handler-name", default="GeneralPretrainHandler",
                   help="AlpacaStyleInstructionHandler, SharegptStyleInstructionHandler, OpenAIInstructionHandler, "
                        "AlpacaStylePairwiseHandler, SharegptStylePairwiseHandler or GeneralPretrainHandler")
    g.add_argument("--map-keys", default=None,
                   help="JSON object renaming columns, e.g. '{\"prompt\": \"question\", \"response\": \"answer\"}'; "
                        "ShareGPT: '{\"messages\": \"dialog\", \"tags\": {\"role_tag\": \"role\", ...}}'")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="GeneralPretrainHandler: the text columns")
    g.add_argument("--max-samples", type=int, default=None, help="stop after this many samples")
    g.add_argument("--seed", type=int, default=1234, help="seed of the path#N sampling")
    g.add_argument("--model-name", default=None, help="replaces <NAME> in the samples (self-cognition data)")
    g.add_argument("--model-author", default=None, help="replaces <AUTHOR> in the samples (self-cognition data)")
    g.add_argument("--skip-bad-samples", action="store_true",
                   help="skip malformed samples and count them in the summary instead of stopping at the first")

    add_tokenizer_args(parser)
    add_prompt_args(parser)

    g = parser.add_argument_group("length and packing")
    g.add_argument("--seq-length", type=int, default=None,
                   help="samples with length >= seq-length are dropped and counted (instruction data); the "
                        "length of every pack with --pack")
    g.add_argument("--pack", action="store_true",
                   help="pack samples greedily into seq-length - 1 tokens and pad to seq-length")
    g.add_argument("--neat-pack", action="store_true",
                   help="pack, with attention_mask holding segment ids 1, 2, 3, ... (0 on padding); implies --pack")
    g.add_argument("--pad-to-multiple-of", type=int, default=1,
                   help="pad every sample (or pretraining document) to a multiple of this, e.g. 2 x context-"
                        "parallel size")
    g.add_argument("--append-eod", action="store_true", help="append the eos token to every sample (trained)")

    g = parser.add_argument_group("run")
    g.add_argument("--workers", type=int, default=1, help="tokenizing processes; outputs do not depend on it")
    g.add_argument("--log-interval", type=int, default=100, help="samples between progress-bar updates")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (the summary is still printed)")
    g.add_argument("--overwrite-cache", action="store_true",
                   help="accepted for MindSpeed-LLM scripts; there is no cache, every run starts afresh")
    g.add_argument("--cache-dir", default=None,
                   help="accepted for MindSpeed-LLM scripts; there is no cache, so it is not used")
