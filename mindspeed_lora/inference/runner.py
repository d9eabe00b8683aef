"""inference.py's job: build the model once, then run each ``--task`` on the prompts or interactively."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

from mindspeed_lora.errors import UserError
from mindspeed_lora.inference.chat import ChatSession, interactive
from mindspeed_lora.inference.generation import Generated, GenerationConfig, generate, sampling_generator
from mindspeed_lora.inference.prompting import ChatFormat, StopTokens, chat_format, stop_tokens
from mindspeed_lora.inference.streaming import TextStreamer
from mindspeed_lora.jsonl import iter_json_objects

DEFAULT_PROMPT = "how are you?"


@dataclass
class Request:
    """One prompt: a conversation to answer, and the input record it came from (echoed in the output)."""

    messages: list[dict]
    record: dict


def generation_config(args: argparse.Namespace, task: str, stops: StopTokens, pad_id: int) -> GenerationConfig:
    sample = task in ("do_sample", "beam_search_with_sampling")
    beams = args.num_beams if task.startswith("beam_search") else 1
    if task.startswith("beam_search") and beams < 2:
        raise UserError(f"--task {task} needs --num-beams >= 2 (got {args.num_beams})")
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens, do_sample=sample, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, num_beams=beams, length_penalty=args.length_penalty,
        use_kv_cache=args.use_kv_cache, stop_token_ids=stops.token_ids, stop_sequences=stops.sequences,
        pad_token_id=pad_id, seed=args.seed,
    )


def _messages(record: dict, where: str) -> list[dict]:
    system = record.get("system")
    msgs = [{"role": "system", "content": system}] if system else []
    history = record.get("history") or []
    if not isinstance(history, list):
        raise UserError(f"{where}: \"history\" must be a list of [user, assistant] pairs")
    for turn in history:
        if isinstance(turn, (list, tuple)) and len(turn) == 2:
            msgs += [{"role": "user", "content": str(turn[0])}, {"role": "assistant", "content": str(turn[1])}]
        else:
            raise UserError(f"{where}: history entry {turn!r}: expected [user, assistant]")
    if "messages" in record:
        given = record["messages"]
        if not isinstance(given, list) or not given or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in given):
            raise UserError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
        if given[-1]["role"] != "user":
            raise UserError(f"{where}: the last message must have role \"user\" (it is the one answered)")
        msgs += [{"role": m["role"], "content": str(m["content"])} for m in given]
    elif "prompt" in record:
        msgs.append({"role": "user", "content": str(record["prompt"])})
    else:
        raise UserError(f"{where}: expected a \"prompt\" string or a \"messages\" list")
    if not msgs[-1]["content"].strip():
        raise UserError(f"{where}: empty prompt")
    return msgs


def read_requests(args: argparse.Namespace) -> list[Request]:
    if args.input_file is not None and args.prompt:
        raise UserError("give prompts with --prompt or --input-file, not both")
    if args.input_file is not None:
        path = args.input_file
        if not os.path.isfile(path):
            raise UserError(f"--input-file {path}: no such file")
        out = [Request(_messages(record, where), record) for where, record in iter_json_objects(path)]
        if not out:
            raise UserError(f"--input-file {path}: no prompts")
        return out
    prompts = args.prompt if args.prompt else [DEFAULT_PROMPT]
    return [Request(_messages({"prompt": p}, "--prompt"), {"prompt": p}) for p in prompts]


class Runner:
    """The model, tokenizer, chat format and rank layout shared by every task."""

    def __init__(self, args: argparse.Namespace, engine, tokenizer, fmt: ChatFormat, stops: StopTokens, info):
        self.args, self.engine, self.tokenizer = args, engine, tokenizer
        self.fmt, self.stops, self.info = fmt, stops, info
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.rank0 = info.rank == 0

    def encode(self, messages: list[dict]) -> list[int]:
        ids = self.fmt.encode(messages)
        if not ids:
            raise UserError("a prompt encodes to no tokens")
        return ids

    def decode(self, out: Generated) -> str:
        return self.tokenizer.decode(out.content_tokens, skip_special_tokens=True)

    def run_batch(self, prompts: list[list[int]], cfg: GenerationConfig, stream: bool,
                  generator=None) -> list[Generated]:
        if stream and len(prompts) == 1:
            streamer = TextStreamer(self.tokenizer, set(cfg.stop_token_ids)) if self.rank0 else None
            outs = generate(self.engine, prompts, cfg, generator=generator,
                            on_token=(lambda row, toks: streamer.update(toks)) if streamer else None)
            if streamer:
                streamer.finish(outs[0].content_tokens)
            return outs
        return generate(self.engine, prompts, cfg, generator=generator)

    def run_requests(self, task: str, requests: list[Request]) -> list[dict]:
        """Every data-parallel rank generates its share; rank 0 gets all results, in input order."""
        import torch.distributed as dist

        cfg = generation_config(self.args, task, self.stops, self.pad_id)
        dp, dp_rank = self.info.dp_size, self.info.dp_rank
        mine = list(range(len(requests)))[dp_rank::dp]
        stream = self.args.stream and dp == 1
        # one random stream for the whole task: the same prompt twice gets two samples
        generator = sampling_generator(self.engine, cfg) if cfg.do_sample else None
        results: dict[int, dict] = {}
        batch = 1 if stream else max(1, self.args.micro_batch_size)
        for start in range(0, len(mine), batch):
            idx = mine[start:start + batch]
            if stream and self.rank0:
                print(f"\n[{task}] You:\n{requests[idx[0]].messages[-1]['content']}\n\nAssistant:", flush=True)
            outs = self.run_batch([self.encode(requests[i].messages) for i in idx], cfg, stream, generator)
            for i, out in zip(idx, outs):
                results[i] = {**requests[i].record, "response": self.decode(out),
                              "finish_reason": out.finish_reason, "task": task}
        if dp > 1:
            from megatron.core import parallel_state as ps

            parts: list = [None] * dp
            dist.all_gather_object(parts, results, group=ps.get_data_parallel_group())
            results = {k: v for part in parts for k, v in part.items()}
        return [results[i] for i in range(len(requests))]

    def respond_chat(self, cfg: GenerationConfig):
        generator = sampling_generator(self.engine, cfg)  # continues from reply to reply

        def respond(prompt_ids: list[int]) -> str:
            outs = self.run_batch([prompt_ids], cfg, self.args.stream, generator)
            text = self.decode(outs[0])
            if self.rank0 and not self.args.stream:
                print(text, flush=True)
            return text

        return respond


def write_jsonl(path: str, rows: list[dict]) -> None:
    from mindspeed_lora.checkpoint.megatron_io import atomic_write_text

    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def run(args: argparse.Namespace) -> None:
    from mindspeed_lora.inference.model import (
        build_inference_engine,
        checkpoint_kind,
        load_tokenizer,
        model_source_from_args,
        tokenizer_dir,
    )
    from mindspeed_lora.parallel import initialize, shutdown

    if args.history_turns < 0:
        raise UserError(f"--history-turns={args.history_turns}: expected >= 0")
    if args.prompt and any(not p.strip() for p in args.prompt):
        raise UserError("--prompt: empty prompt")
    source = model_source_from_args(args)
    checkpoint_kind(args.load)
    requests = None if args.task == ["chat"] else read_requests(args)
    tok_dir = tokenizer_dir(args.load, args.tokenizer_name_or_path)
    tokenizer = load_tokenizer(tok_dir, use_fast=not args.tokenizer_not_use_fast)
    fmt = chat_format(tokenizer, tok_dir, args.prompt_type, args.prompt_type_path, args.enable_thinking,
                      args.hf_chat_template)
    stops = stop_tokens(tokenizer, fmt, args.add_eos_token)
    info = initialize(args.tensor_model_parallel_size, 1, seed=args.seed)
    try:
        engine, _ = build_inference_engine(source, info.tp_rank)
        runner = Runner(args, engine, tokenizer, fmt, stops, info)
        all_rows = []
        for task in args.task:
            if task == "chat":
                cfg = generation_config(args, "do_sample", stops, runner.pad_id)
                interactive(ChatSession(fmt, runner.respond_chat(cfg), args.history_turns), info.rank == 0)
                continue
            rows = runner.run_requests(task, requests)
            all_rows += rows
            if info.rank == 0 and args.input_file is None:
                for row in rows:
                    if not (args.stream and info.dp_size == 1):
                        print(f"\n[{task}] You:\n{row['prompt']}\n\nAssistant:\n{row['response']}", flush=True)
        if info.rank == 0 and args.input_file is not None:
            out = args.output_file or os.path.splitext(args.input_file)[0] + ".out.jsonl"
            write_jsonl(out, all_rows)
            print(f"wrote {len(all_rows)} responses to {out}", flush=True)
        elif info.rank == 0 and args.output_file:
            write_jsonl(args.output_file, all_rows)
    finally:
        shutdown()


def main(argv=None) -> None:
    from mindspeed_lora.arguments import parse_args
    from mindspeed_lora.errors import main_guard

    main_guard(lambda: run(parse_args("inference", argv)))()
    sys.stdout.flush()
