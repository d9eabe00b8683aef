"""evaluation.py's job: build the model once, score each ``--task``, write JSON and print a table on rank 0."""
from __future__ import annotations

import argparse

from mindspeed_lora.errors import UserError
from mindspeed_lora.evaluation.evaluator import (
    EvalConfig,
    ExamScorer,
    data_split,
    evaluate,
    format_table,
    summarize,
    write_results,
)


def eval_configs(args: argparse.Namespace) -> list[EvalConfig]:
    if len(args.task_data_path) != len(args.task):
        raise UserError(f"--task has {len(args.task)} entries but --task-data-path has {len(args.task_data_path)}; "
                        "give one data path per task")
    return [
        EvalConfig(task=task, data_path=path, split=args.eval_split, shots=args.num_shots, method=args.eval_method,
                   max_eval_samples=args.max_eval_samples,
                   batch_size=args.evaluation_batch_size or args.micro_batch_size,
                   language=args.eval_language, max_new_tokens=args.max_new_tokens,
                   output_dir=args.eval_output_dir)
        for task, path in zip(args.task, args.task_data_path)
    ]


def run(args: argparse.Namespace) -> list[dict]:
    from megatron.core import parallel_state as ps

    from mindspeed_lora.inference.model import (
        build_inference_engine,
        checkpoint_kind,
        load_tokenizer,
        model_source_from_args,
        tokenizer_dir,
    )
    from mindspeed_lora.inference.prompting import RawFormat, chat_format, stop_tokens
    from mindspeed_lora.inference.runner import generation_config
    from mindspeed_lora.parallel import initialize, shutdown

    configs = eval_configs(args)
    source = model_source_from_args(args)
    checkpoint_kind(args.load)
    splits = [data_split(cfg) for cfg in configs]  # bad data fails before the model is built
    tok_dir = tokenizer_dir(args.load, args.tokenizer_name_or_path)
    tokenizer = load_tokenizer(tok_dir, use_fast=not args.tokenizer_not_use_fast)
    fmt = RawFormat(tokenizer) if args.no_chat_template else chat_format(
        tokenizer, tok_dir, args.prompt_type, args.prompt_type_path, args.enable_thinking, args.hf_chat_template)
    stops = stop_tokens(tokenizer, fmt, args.add_eos_token)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    # Each task has its own generation budget (--max-new-tokens, else the task's default).
    gen_cfgs = [generation_config(argparse.Namespace(**{**vars(args), "max_new_tokens": cfg.max_new_tokens}),
                                  "greedy", stops, pad_id) for cfg in configs]
    info = initialize(args.tensor_model_parallel_size, 1, seed=args.seed)
    summaries = []
    try:
        engine, _ = build_inference_engine(source, info.tp_rank)
        for cfg, split, gen_cfg in zip(configs, splits, gen_cfgs):
            scorer = ExamScorer(engine, tokenizer, cfg, fmt, gen_cfg)
            preds = evaluate(scorer, info.dp_rank, info.dp_size, ps.get_data_parallel_group(),
                             progress=info.rank == 0)
            summary = summarize(preds, cfg, split)
            summaries.append(summary)
            if info.rank == 0:
                acc_path, _ = write_results(summary, preds, cfg.output_dir)
                print(f"\n{cfg.task} ({summary['split']} split, {cfg.shots}-shot, {cfg.method})", flush=True)
                print(format_table(summary), flush=True)
                if summary["truncated_prompts"]:
                    print(f"warning: {summary['truncated_prompts']} prompts were longer than the model's "
                          f"{engine.max_positions} positions and lost their oldest tokens (fewer shots, or a "
                          "larger --seq-length / max_position_embeddings)", flush=True)
                print(f"wrote {acc_path}", flush=True)
    finally:
        shutdown()
    return summaries


def main(argv=None) -> None:
    from mindspeed_lora.arguments import parse_args
    from mindspeed_lora.errors import main_guard

    main_guard(lambda: run(parse_args("evaluation", argv)))()
