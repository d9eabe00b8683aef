"""Flags of inference.py and evaluation.py (MindSpeed-LLM names), and the typed configs built from them."""
from __future__ import annotations

import argparse
import importlib.util

from mindspeed_lora.arguments.common import add_lora_args, add_parallel_args, add_prompt_args, add_tokenizer_args

INFERENCE_TASKS = ("greedy", "do_sample", "beam_search", "beam_search_with_sampling", "chat")
EVAL_TASKS = ("mmlu", "cmmlu", "ceval", "boolq", "gsm8k")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    # --load, the architecture flags (they override the checkpoint's, as in training), --bf16/--fp16, and the
    # MindSpeed-LLM flags that name fixed behaviour: shared with posttrain_gpt.py so the same scripts run.
    from mindspeed_lora.arguments.training import add_compat_args
    from mindspeed_lora.arguments.training import add_model_args as add_architecture_args

    add_tokenizer_args(parser)
    add_prompt_args(parser)
    add_lora_args(parser)
    add_parallel_args(parser)
    add_architecture_args(parser)
    add_compat_args(parser)
    g = parser.add_argument_group("inference model")
    g.add_argument("--seq-length", type=int, default=None,
                   help="longest prompt + generated text (default: the model's max_position_embeddings)")
    g.add_argument("--seed", type=int, default=1234, help="seed of sampling (the same on every rank)")
    g.add_argument("--micro-batch-size", type=int, default=4,
                   help="prompts generated (or questions scored, unless --evaluation-batch-size) together")
    g.add_argument("--no-load-optim", action="store_true", help="always on: only model weights are loaded")
    g.add_argument("--no-load-rng", action="store_true", help="always on: only model weights are loaded")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="accepted for MindSpeed-LLM scripts, no effect: prompts are batched by --micro-batch-size")
    g.add_argument("--max-tokens-to-oom", type=int, default=None,
                   help="accepted for MindSpeed-LLM scripts, no effect: prompt + new tokens are bounded by "
                        "--seq-length (default the model's max_position_embeddings)")
    g.add_argument("--hf-chat-template", action="store_true",
                   help="format prompts with the tokenizer's own chat template instead of --prompt-type")
    g.add_argument("--use-cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="on CUDA, replay each decode step as a CUDA graph (decode at small batch is launch-bound)")
    if importlib.util.find_spec("mindspeed_lora.arguments.fused_ops") is not None:
        from mindspeed_lora.arguments.fused_ops import add_fused_ops_args

        add_fused_ops_args(parser)


def _add_generation_args(parser: argparse.ArgumentParser, max_new_tokens: int | None,
                         max_new_tokens_help: str = "tokens generated per prompt, at most") -> None:
    g = parser.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=max_new_tokens_help)
    g.add_argument("--top-k", type=int, default=50, help="sampling: keep the k most likely tokens (0: all)")
    g.add_argument("--top-p", type=float, default=0.95, help="sampling: nucleus mass")
    g.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    g.add_argument("--num-beams", type=int, default=2, help="beams of the beam_search tasks")
    g.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam search: a finished beam scores sum(log p) / length ** length_penalty")
    g.add_argument("--use-kv-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="keep keys/values of past tokens (--no-use-kv-cache recomputes the sequence each step)")
    g.add_argument("--add-eos-token", nargs="+", default=[],
                   help="more stop words, besides the tokenizer's eos and the template's stop_words")


def add_inference_args(parser: argparse.ArgumentParser) -> None:
    _add_model_args(parser)
    _add_generation_args(parser, max_new_tokens=256)
    g = parser.add_argument_group("inference")
    g.add_argument("--task", nargs="+", default=["greedy"], choices=INFERENCE_TASKS,
                   help="decoding: greedy, do_sample (top-k/top-p/temperature), beam_search, "
                        "beam_search_with_sampling, or chat (interactive, keeps history); several run in turn")
    g.add_argument("--prompt", action="append", default=None,
                   help="a prompt (repeatable); without --prompt or --input-file a built-in question is asked")
    g.add_argument("--input-file", default=None,
                   help="JSON lines, one prompt per line: {\"prompt\": ...} or {\"messages\": [{role, content}]} "
                        "(plus optional \"system\", \"history\"); other keys are copied to the output")
    g.add_argument("--output-file", default=None,
                   help="JSON lines out, one per input line with \"response\" added (default: INPUT.out.jsonl)")
    g.add_argument("--history-turns", type=int, default=3, help="chat: past turns kept in the prompt")
    g.add_argument("--stream", action="store_true", help="print tokens as they are generated (one prompt at a time)")


def add_evaluation_args(parser: argparse.ArgumentParser) -> None:
    _add_model_args(parser)
    _add_generation_args(parser, max_new_tokens=None,
                         max_new_tokens_help="tokens generated per question when scoring by generation, at most "
                                             "(default: 8; 256 for gsm8k)")
    g = parser.add_argument_group("evaluation")
    g.add_argument("--task", nargs="+", required=True, choices=EVAL_TASKS, help="exams to run")
    g.add_argument("--task-data-path", nargs="+", required=True,
                   help="one per --task: for mmlu/cmmlu/ceval a directory of per-subject CSVs (root with dev/ and "
                        "test/ or val/, or the scored split's directory itself); for boolq a .jsonl file or a "
                        "directory of them (question, passage, answer); for gsm8k a .jsonl file or a directory "
                        "with test.jsonl (question, answer ending in '#### <number>')")
    g.add_argument("--eval-split", default=None, choices=["dev", "val", "test"],
                   help="scored split (default: test for mmlu/cmmlu, val for ceval)")
    g.add_argument("--num-shots", type=int, default=5,
                   help="examples before each question: from the dev split (mmlu/cmmlu/ceval), from train.jsonl "
                        "beside gsm8k's file or else from that file itself; boolq is zero-shot")
    g.add_argument("--eval-method", default="logits", choices=["logits", "generate"],
                   help="logits: the most likely answer (letter, or yes/no); generate: greedy text, its first "
                        "letter A-D (or yes/no); gsm8k always generates and reads the last number")
    g.add_argument("--max-eval-samples", type=int, default=None, help="score the first N questions per subject")
    g.add_argument("--evaluation-batch-size", type=int, default=None,
                   help="questions scored together (default: --micro-batch-size)")
    g.add_argument("--eval-language", default=None, choices=["en", "zh"],
                   help="prompt wording (default: en for mmlu, zh for cmmlu/ceval, each in its official format; "
                        "another language gets MMLU's format for en, CMMLU's for zh)")
    g.add_argument("--no-chat-template", action="store_true",
                   help="score raw few-shot prompts even when --prompt-type / --hf-chat-template is given")
    g.add_argument("--eval-output-dir", default="eval_results",
                   help="where <task>_accuracy.json and <task>_predictions.jsonl are written")
