"""Decode speed: our generation (megatron-core GPTModel, static KV cache, CUDA-graph decode step) vs HF
``generate`` on the same random weights, in one run on one GPU.

Default shape: Qwen3-8B (hidden 4096, 36 layers, 32 heads, 8 kv heads, head_dim 128, ffn 12288, vocab 151936),
bf16, batch 1, a 512-token prompt, 256 new tokens (no early stop). Each contender runs a warm-up generation,
then ``--repeats`` timed ones; tokens/s = new tokens / wall time of one whole generation call (prefill
included), median over repeats. Contenders: hf_generate (transformers, SDPA, its default dynamic cache);
ours_graph_fused (the inference.py path on CUDA: fused ops from the layer spec, CUDA-graph decode), and the
same eager and/or with megatron's local layers (ours_{graph,eager}_{fused,unfused}). Our model gets the HF
model's weights; each result reports how many leading greedy tokens agree with HF's (bf16 numerics differ, so
agreement ends somewhere; it should not end at token 0).

Prints one JSON line per contender and a final line with the ratios (target: ours >= 5x HF).

    PYTHONPATH=/path/to/repo:/path/to/megatron python bench/decode_speed.py
    python bench/decode_speed.py --small --device cpu     # a tiny shape, to check the script runs

Needs torch, transformers and megatron-core 0.16.1 importable (PYTHONPATH is enough; nothing is installed).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the package itself, when run from a checkout without installing it
    sys.path.insert(0, ROOT)

QWEN3_8B = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
SMALL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, vocab_size=1024, max_position_embeddings=2048,
             rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times, out


def build_hf(cfg_kwargs: dict, dtype, device, seed: int):
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(**cfg_kwargs, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval(), cfg


def run_hf(model, prompt, new_tokens: int, repeats: int, device) -> tuple[dict, list[int]]:
    import torch

    ids = torch.tensor([prompt], device=device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, **{**kwargs, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up
        times, out = timed(lambda: model.generate(ids, **kwargs), device, repeats)
    tokens = out[0, len(prompt):].tolist()
    assert len(tokens) == new_tokens, f"HF generated {len(tokens)} tokens"
    med = statistics.median(times)
    return {"name": "hf_generate", "tokens_per_s": new_tokens / med, "seconds": med, "all_seconds": times}, tokens


def build_ours(hf_model, cfg, dtype, device, fused_ops: bool):
    from mindspeed_lora.checkpoint.sources import DictSource
    from mindspeed_lora.checkpoint.weight_map import load_hf_weights
    from mindspeed_lora.inference.kv_cache import kv_cache_spec_hook
    from mindspeed_lora.models.arch import ModelArch
    from mindspeed_lora.models.builder import ModelOptions, ParallelOptions, build_gpt_model

    arch = ModelArch.from_hf_config(cfg.to_dict())
    parallel = ParallelOptions()
    hooks = []
    fused = "off"
    if fused_ops:
        try:
            from mindspeed_lora.ops.spec import FusedOpsConfig, fused_ops_spec_hook

            cfg_ops = FusedOpsConfig.for_device(device.type)
            hooks.append(fused_ops_spec_hook(cfg_ops))
            fused = ",".join(cfg_ops.enabled) or "none available"
        except ImportError as e:  # the fused-ops package is optional for this bench
            fused = f"unavailable ({e})"
    hooks.append(kv_cache_spec_hook)
    options = ModelOptions(params_dtype=dtype, use_cpu_initialization=device.type == "cpu", spec_hooks=hooks)
    model = build_gpt_model(arch, parallel, options, pre_process=True, post_process=True).to(device)
    load_hf_weights(model, DictSource(dict(hf_model.state_dict()), "<in-memory HF model>"), arch, parallel, 0, 0)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, arch, fused


def run_ours(model, arch, prompt, new_tokens: int, repeats: int, device, cuda_graph: bool, name: str,
             fused: str) -> tuple[dict, list[int]]:
    from mindspeed_lora.inference.engine import InferenceEngine
    from mindspeed_lora.inference.generation import GenerationConfig, generate

    engine = InferenceEngine(model, arch.max_position_embeddings, use_cuda_graph=cuda_graph)
    cfg = GenerationConfig(max_new_tokens=new_tokens, stop_token_ids=())
    # Warm-up with the timed shapes: the KV cache (and the CUDA graph) are made once and reused.
    t = time.perf_counter()
    generate(engine, [prompt], cfg)
    sync(device)
    warmup = time.perf_counter() - t
    times, out = timed(lambda: generate(engine, [prompt], cfg), device, repeats)
    tokens = out[0].tokens
    assert len(tokens) == new_tokens, f"{name} generated {len(tokens)} tokens"
    med = statistics.median(times)
    engine.release()
    return {"name": name, "tokens_per_s": new_tokens / med, "seconds": med, "all_seconds": times,
            "warmup_seconds": warmup, "cuda_graph": engine.use_cuda_graph, "fused_ops": fused}, tokens


def agreement(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=None, help="override the number of layers (quick runs)")
    p.add_argument("--small", action="store_true", help="a tiny shape instead of Qwen3-8B")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--no-fused-ops", action="store_true", help="megatron's local layers only")
    p.add_argument("--skip-eager", action="store_true", help="do not time ours without CUDA graphs")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    import torch

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    os.environ.setdefault("MINDSPEED_LORA_DEVICE", device.type)
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    shape = dict(SMALL if a.small else QWEN3_8B)
    if a.layers:
        shape["num_hidden_layers"] = a.layers
    info = {"name": "setup", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""), "batch": 1,
            "prompt_tokens": a.prompt_len, "new_tokens": a.new_tokens, "repeats": a.repeats, "shape": shape}
    try:
        import megatron.core
        import transformers

        info.update(transformers=transformers.__version__, megatron_core=megatron.core.__version__)
    except ImportError as e:
        emit({**info, "error": f"missing dependency: {e}; put megatron-core on PYTHONPATH"})
        return 2
    emit(info)

    from mindspeed_lora.parallel import initialize, shutdown

    initialize(1, 1, seed=a.seed)
    g = torch.Generator().manual_seed(a.seed)
    prompt = torch.randint(0, shape["vocab_size"], (a.prompt_len,), generator=g).tolist()
    results: dict[str, dict] = {}
    tokens: dict[str, list[int]] = {}
    expected: list[str] = ["hf_generate"]
    hf_model, cfg = build_hf(shape, dtype, device, a.seed)
    try:
        results["hf_generate"], tokens["hf_generate"] = run_hf(hf_model, prompt, a.new_tokens, a.repeats, device)
        emit(results["hf_generate"])
    except Exception as e:
        emit({"name": "hf_generate", "error": repr(e), "traceback": traceback.format_exc()[-2000:]})
    # The HF model stays alive: each of our variants is built from its weights (two 8B copies fit in 80 GB).
    variants = [("unfused", False)] if a.no_fused_ops else [("fused", True), ("unfused", False)]
    modes = [("graph", True)] if device.type == "cuda" else []
    if not a.skip_eager or device.type != "cuda":
        modes.append(("eager", False))
    for variant, fused_ops in variants:
        try:
            model, arch, fused = build_ours(hf_model, cfg, dtype, device, fused_ops)
        except Exception as e:
            emit({"name": f"ours_{variant}", "error": repr(e), "traceback": traceback.format_exc()[-2000:]})
            continue
        for mode, graph in modes:
            name = f"ours_{mode}_{variant}"
            expected.append(name)
            try:
                results[name], tokens[name] = run_ours(model, arch, prompt, a.new_tokens, a.repeats, device, graph,
                                                       name, fused)
                if "hf_generate" in tokens:
                    results[name]["greedy_tokens_agreeing_with_hf"] = agreement(tokens[name], tokens["hf_generate"])
                emit(results[name])
            except Exception as e:
                emit({"name": name, "error": repr(e), "traceback": traceback.format_exc()[-2000:]})
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    summary: dict = {"name": "ratio", "target": 5.0}
    if "hf_generate" in results:
        hf_rate = results["hf_generate"]["tokens_per_s"]
        ratios = {f"{n}_vs_hf": r["tokens_per_s"] / hf_rate for n, r in results.items() if n != "hf_generate"}
        summary.update(ratios)
        summary["best_vs_hf"] = max(ratios.values(), default=None)
        summary["meets_target"] = bool(ratios) and summary["best_vs_hf"] >= summary["target"]
    for variant, _ in variants:
        graph, eager = tokens.get(f"ours_graph_{variant}"), tokens.get(f"ours_eager_{variant}")
        if graph is not None and eager is not None:
            summary[f"graph_and_eager_tokens_equal_{variant}"] = graph == eager
    emit(summary)
    shutdown()
    return 0 if all(n in results for n in expected) else 1


if __name__ == "__main__":
    sys.exit(main())
