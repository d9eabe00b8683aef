"""Generation and evaluation on 2 gloo ranks (see test_inference.py), all in one torchrun launch.

Oracle: the single-rank (TP=1) run. TP=1 runs on both ranks as DP=2 first, then TP=2 splits the same model;
tokens (greedy, sampling, beam search) and evaluation predictions must be identical.
"""
import os

import torch
import torch.distributed as dist

from mindspeed_lora import tiny
from mindspeed_lora.inference.generation import GenerationConfig, generate
from mindspeed_lora.inference.model import ModelSource, build_inference_engine
from mindspeed_lora.parallel import initialize

NEW = 50
EOS = 2


def _shared_dir(tmp, name, build):
    path = os.path.join(tmp, name)
    if dist.get_rank() == 0:
        build(path)
    dist.barrier()
    return path


def _lively(path, family="qwen3", seed=3, **overrides):
    from tests.unit.test_inference import build_lively_model

    build_lively_model(family, path, seed=seed, **overrides)
    tiny.build_tokenizer(path)


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in (9, 4, 13)]


CONFIGS = {
    "greedy": dict(),
    "sample": dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, seed=21),
    "beam": dict(num_beams=3),
    "greedy_no_cache": dict(use_kv_cache=False),
}


def _generate_all(path, tp):
    info = initialize(tp, 1, seed=9)
    engine, _ = build_inference_engine(ModelSource(load=path, tensor_model_parallel_size=tp), info.tp_rank)
    out = {}
    for name, kw in CONFIGS.items():
        cfg = GenerationConfig(max_new_tokens=NEW, stop_token_ids=(EOS,), **kw)
        out[name] = [o.tokens for o in generate(engine, _prompts(), cfg)]
    return out


def _same_on_all_ranks(obj):
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    assert all(p == parts[0] for p in parts), f"ranks disagree: {parts}"


def _check_tp2_equals_tp1(tmp, family):
    path = _shared_dir(tmp, family, lambda p: _lively(p, family))
    tp1 = _generate_all(path, 1)
    tp2 = _generate_all(path, 2)
    for name in CONFIGS:
        assert tp2[name] == tp1[name], f"{family} {name}: TP=2 {tp2[name]} != TP=1 {tp1[name]}"
    assert tp1["greedy"] == tp1["greedy_no_cache"]
    _same_on_all_ranks(tp2)


def check_tp2_tokens_equal_tp1_qwen3(tmp):
    _check_tp2_equals_tp1(tmp, "qwen3")


def check_tp2_tokens_equal_tp1_qwen2_tied_bias(tmp):
    _check_tp2_equals_tp1(tmp, "qwen2")


def check_evaluation_split_over_dp_and_tp(tmp):
    """DP=2 (each rank scores half) and TP=2 give the predictions of one rank scoring everything."""
    from megatron.core import parallel_state as ps

    from mindspeed_lora.evaluation.evaluator import EvalConfig, ExamScorer, evaluate
    from mindspeed_lora.inference.model import load_tokenizer
    from tests.unit.test_evaluation import make_exam

    path = _shared_dir(tmp, "eval_model", lambda p: _lively(p, seed=14, max_position_embeddings=1024))
    root = _shared_dir(tmp, "exam", lambda p: make_exam(p, n_test=5))
    tok = load_tokenizer(path)
    cfg = EvalConfig(task="mmlu", data_path=root, batch_size=3)
    info = initialize(1, 1, seed=9)
    engine, _ = build_inference_engine(ModelSource(load=path), info.tp_rank)
    whole = evaluate(ExamScorer(engine, tok, cfg))  # every rank scores everything
    split = evaluate(ExamScorer(engine, tok, cfg), info.dp_rank, info.dp_size, ps.get_data_parallel_group())
    assert info.dp_size == 2
    assert split == whole
    info = initialize(2, 1, seed=9)
    engine, _ = build_inference_engine(ModelSource(load=path, tensor_model_parallel_size=2), info.tp_rank)
    tp2 = evaluate(ExamScorer(engine, tok, cfg), info.dp_rank, info.dp_size, ps.get_data_parallel_group())
    assert tp2 == whole
    assert len({p.prediction for p in whole}) > 1


def check_input_file_requests_split_over_dp(tmp):
    """inference.py's request loop at DP=2: each rank generates every other prompt, rank 0 gets all in order."""
    from mindspeed_lora.arguments import parse_args
    from mindspeed_lora.inference.model import load_tokenizer
    from mindspeed_lora.inference.prompting import chat_format, stop_tokens
    from mindspeed_lora.inference.runner import Request, Runner

    path = _shared_dir(tmp, "dp_model", _lively)
    args = parse_args("inference", ["--load", path, "--max-new-tokens", "20", "--micro-batch-size", "2"])
    info = initialize(1, 1, seed=9)
    assert info.dp_size == 2
    engine, _ = build_inference_engine(ModelSource(load=path), info.tp_rank)
    tok = load_tokenizer(path)
    fmt = chat_format(tok, path, None, None)
    runner = Runner(args, engine, tok, fmt, stop_tokens(tok, fmt), info)
    texts = ["The quick brown fox", "Hello! I am", "1 + 1 =", "中国的首都是", "Translate the sentence"]
    requests = [Request([{"role": "user", "content": t}], {"prompt": t, "n": i}) for i, t in enumerate(texts)]
    rows = runner.run_requests("greedy", requests)
    assert [r["n"] for r in rows] == list(range(len(texts)))
    cfg = GenerationConfig(max_new_tokens=20, stop_token_ids=(tok.eos_token_id,))
    for text, row in zip(texts, rows):  # the oracle: this rank alone, one prompt at a time
        out = generate(engine, [fmt.encode([{"role": "user", "content": text}])], cfg)[0]
        assert row["response"] == tok.decode(out.content_tokens, skip_special_tokens=True)


def check_lora_tp2_tokens_equal_tp1(tmp):
    """A LoRA adapter saved at TP=1 and at TP=2 (split with the converter's adapter rules): same tokens."""
    from mindspeed_lora.checkpoint.lora_layout import adapter_rules
    from mindspeed_lora.checkpoint.sharding import split_full
    from mindspeed_lora.models.arch import ModelArch
    from mindspeed_lora.models.builder import ParallelOptions
    from mindspeed_lora.models.family import read_hf_config
    from mindspeed_lora.parallel import rank_info
    from tests.unit.test_inference_lora import TARGETS, _megatron_state, _write_adapter_checkpoint, random_adapter

    path = _shared_dir(tmp, "lora_base", lambda p: _lively(p, seed=21))
    arch = ModelArch.from_hf_config(read_hf_config(path))
    info = initialize(1, 1, seed=9)
    adapter = random_adapter(_megatron_state(path), seed=3)  # the same on both ranks (seeded)
    tp1_dir, tp2_dir = os.path.join(tmp, "lora_tp1"), os.path.join(tmp, "lora_tp2")
    _write_adapter_checkpoint(tp1_dir, path, adapter)
    engine, _ = build_inference_engine(ModelSource(load=path, lora_load=tp1_dir), info.tp_rank)
    cfg = GenerationConfig(max_new_tokens=NEW, stop_token_ids=(EOS,))
    tp1 = [o.tokens for o in generate(engine, _prompts(), cfg)]
    plain, _ = build_inference_engine(ModelSource(load=path), info.tp_rank)
    assert tp1 != [o.tokens for o in generate(plain, _prompts(), cfg)], "the adapter changed nothing"

    info = initialize(2, 1, seed=9)
    par = ParallelOptions(tensor_model_parallel_size=2)
    rules = adapter_rules(arch, par, 0, TARGETS)
    shard = {k: split_full(rules[k].kind, t, 2, info.tp_rank) for k, t in adapter.items()}
    _write_adapter_checkpoint(tp2_dir, path, shard, par)
    engine, _ = build_inference_engine(ModelSource(load=path, lora_load=tp2_dir, tensor_model_parallel_size=2),
                                       info.tp_rank)
    tp2 = [o.tokens for o in generate(engine, _prompts(), cfg)]
    assert tp2 == tp1, f"TP=2 {tp2} != TP=1 {tp1}"
    assert rank_info().tp_size == 2
