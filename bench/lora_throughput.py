"""LoRA training throughput: mindspeed_lora's posttrain_gpt.py vs HF transformers + PEFT, one GPU, one run.

Both train the same Qwen3-shaped model (random bf16 weights; throughput does not depend on values) with LoRA
on every linear (q,k,v,o,gate,up,down), the same rank and alpha, on random token data. The peer is set up as
a careful user would: SDPA attention, bf16 weights, fused AdamW, gradient checkpointing (use_reentrant=False)
where the config asks for recompute. Ours is the real training script (a subprocess) on an HF directory
written here, so loading and the whole training step are what a user runs.

Model FLOPs per token for LoRA with a frozen base: 4N (forward + input-grad backward of every linear) +
3 x attention forward (causal), N = matmul parameters incl. the output layer. MFU is against a bf16 matmul
peak measured in the same run.

Configs: a = seq 4096, no recompute, the largest micro-batch that fits (ours tries 4, 2, 1; HF 2, 1);
         b = seq 4096, full recompute, micro-batch 1;
         c = the longest sequence that trains with recompute (tries 131072, 65536, 32768, 16384).
Usage: python bench/lora_throughput.py [--model qwen3-8b] [--configs a,b,c] [--which ours,hf] [--steps 6]
Prints one JSON line per measurement and a table of ours/HF ratios at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPES = {  # hidden, layers, heads, kv heads, head dim, ffn, vocab
    "qwen3-8b": (4096, 36, 32, 8, 128, 12288, 151936),
    "qwen3-1.7b": (2048, 28, 16, 8, 128, 6144, 151936),
    "qwen3-0.6b": (1024, 28, 16, 8, 128, 3072, 151936),
    "tiny": (64, 2, 4, 2, 32, 128, 512),  # a smoke run of the harness on the CPU (--which ours)
}
TARGETS_HF = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_flops_per_token(shape, seq: int) -> float:
    h, layers, nh, nkv, hd, ffn, vocab = shape
    per_layer = h * nh * hd + 2 * h * nkv * hd + nh * hd * h + 3 * h * ffn
    n_matmul = layers * per_layer + h * vocab
    attn_fwd = layers * 2 * seq * nh * hd  # causal: half of QK^T + AV
    return 4 * n_matmul + 3 * attn_fwd


def hf_config(shape, seq: int):
    from transformers import Qwen3Config

    h, layers, nh, nkv, hd, ffn, vocab = shape
    return Qwen3Config(hidden_size=h, num_hidden_layers=layers, num_attention_heads=nh, num_key_value_heads=nkv,
                       head_dim=hd, intermediate_size=ffn, vocab_size=vocab,
                       max_position_embeddings=max(seq, 4096), tie_word_embeddings=False,
                       torch_dtype="bfloat16", rope_theta=1000000.0)


def matmul_peak() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 20 * 2 * 8192 ** 3 / (time.perf_counter() - t) / 1e12


# ----------------------------------------------------------------------------------------------- peer


def run_hf(shape, seq, mbs, recompute, rank, steps, warmup):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3ForCausalLM

    cfg = hf_config(shape, seq)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    if recompute:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS_HF,
                                             lora_dropout=0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    ids = torch.randint(0, shape[-1], (mbs, seq), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    times = []
    try:
        for i in range(warmup + steps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t)
        med = sorted(times)[len(times) // 2]
        return dict(tokens_per_s=mbs * seq / med, peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30)
    finally:
        del model, opt
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- ours


def write_random_hf_model(shape, seq, out_dir: str) -> None:
    """An HF Qwen3 directory with random bf16 weights, written layer by layer straight from the GPU."""
    from safetensors.torch import save_file

    if os.path.exists(os.path.join(out_dir, "model.safetensors.index.json")):
        return
    os.makedirs(out_dir, exist_ok=True)
    h, layers, nh, nkv, hd, ffn, vocab = shape
    hf_config(shape, seq).save_pretrained(out_dir)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*s):
        return (0.02 * torch.randn(*s, generator=g, device=dev)).to(torch.bfloat16)

    weight_map = {}

    def put(fname, tensors):
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, os.path.join(out_dir, fname))
        weight_map.update({k: fname for k in tensors})

    ones = lambda n: torch.ones(n, dtype=torch.bfloat16)  # noqa: E731
    put("embed.safetensors", {"model.embed_tokens.weight": rnd(vocab, h), "lm_head.weight": rnd(vocab, h),
                              "model.norm.weight": ones(h)})
    for i in range(layers):
        p = f"model.layers.{i}."
        put(f"layer{i}.safetensors", {
            p + "self_attn.q_proj.weight": rnd(nh * hd, h), p + "self_attn.k_proj.weight": rnd(nkv * hd, h),
            p + "self_attn.v_proj.weight": rnd(nkv * hd, h), p + "self_attn.o_proj.weight": rnd(h, nh * hd),
            p + "self_attn.q_norm.weight": ones(hd), p + "self_attn.k_norm.weight": ones(hd),
            p + "mlp.gate_proj.weight": rnd(ffn, h), p + "mlp.up_proj.weight": rnd(ffn, h),
            p + "mlp.down_proj.weight": rnd(h, ffn), p + "input_layernorm.weight": ones(h),
            p + "post_attention_layernorm.weight": ones(h)})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def write_random_data(prefix: str, seq: int, samples: int, vocab: int) -> None:
    """An SFT dataset as preprocess_data.py writes it: every token of every sample is a target."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    ids = [rng.integers(0, vocab, seq, dtype=np.int32) for _ in range(samples)]
    for key, rows in (("input_ids", ids), ("labels", ids), ("attention_mask", [np.ones(seq, np.int32)] * samples)):
        path = f"{prefix}_packed_{key}_document"
        builder = IndexedDatasetBuilder(path + ".bin", dtype=np.int32)
        for r in rows:
            builder.add_document(torch.from_numpy(r), [len(r)])
        builder.finalize(path + ".idx")


_TOK = re.compile(r"tokens/s: ([0-9.]+)")
_MEM = re.compile(r"mem GiB alloc/peak/reserved: ([0-9.]+)/([0-9.]+)/([0-9.]+)")


def run_ours(shape, seq, mbs, recompute, rank, steps, warmup, model_dir, work, extra=(), recompute_flags=None):
    data = os.path.join(work, f"data_{seq}_{mbs}")
    write_random_data(data, seq, mbs * (steps + warmup + 1), shape[-1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", "--master-port=29611",
           os.path.join(ROOT, "posttrain_gpt.py"), "--load", model_dir, "--data-path", data,
           "--is-instruction-dataset", "--seq-length", str(seq), "--micro-batch-size", str(mbs),
           "--global-batch-size", str(mbs), "--train-iters", str(steps + warmup), "--bf16", "--lr", "1e-4",
           "--lr-decay-style", "constant", "--log-interval", "1", "--no-shuffle",
           "--lora-r", str(rank), "--lora-alpha", str(2 * rank),
           "--lora-target-modules", "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", *extra]
    if recompute:
        cmd += recompute_flags or ["--recompute-granularity", "full", "--recompute-method", "uniform",
                                   "--recompute-num-layers", "1"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               CUDA_DEVICE_MAX_CONNECTIONS="1")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    with open(os.path.join(work, f"ours_seq{seq}_mbs{mbs}{'_recompute' if recompute else ''}.log"), "w") as f:
        f.write(out.stdout + out.stderr)
    lines = [ln for ln in out.stdout.splitlines() if "tokens/s:" in ln]
    if out.returncode != 0 or len(lines) < steps + warmup:
        tail = (out.stdout + out.stderr)[-1500:]
        oom = "OutOfMemoryError" in tail or "out of memory" in tail
        return dict(error="OOM" if oom else f"exit {out.returncode}: {tail}")
    toks = sorted(float(_TOK.search(ln).group(1)) for ln in lines[warmup:])
    peak = max(float(_MEM.search(ln).group(2)) for ln in lines)
    step_ms = [round(mbs * seq / float(_TOK.search(ln).group(1)) * 1e3, 1) for ln in lines]
    return dict(tokens_per_s=toks[len(toks) // 2], peak_gib=peak, step_ms=step_ms)


# ----------------------------------------------------------------------------------------------- main


def measure(which, cfg_name, shape, seq, mbs, recompute, a, model_dir, work, peak):
    # long sequences: a step is seconds long, so fewer of them give as steady a median
    steps, warmup = (a.steps, a.warmup) if seq <= 8192 else (2, 1)
    if which == "hf":
        try:
            r = run_hf(shape, seq, mbs, recompute, a.rank, steps, warmup)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            r = dict(error="OOM")
    else:
        r = run_ours(shape, seq, mbs, recompute, a.rank, steps, warmup, model_dir, work,
                     extra=shlex.split(a.ours_extra), recompute_flags=shlex.split(a.ours_recompute) or None)
    r = dict(which=which, config=cfg_name, model=a.model, seq=seq, mbs=mbs, recompute=recompute, lora_r=a.rank, **r)
    if "tokens_per_s" in r:
        tflops = lora_flops_per_token(shape, seq) * r["tokens_per_s"] / 1e12
        r.update(tokens_per_s=round(r["tokens_per_s"]), model_tflops=round(tflops, 1),
                 mfu=round(tflops / peak, 3), peak_gib=round(r["peak_gib"], 1))
    print(json.dumps(r), flush=True)
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen3-8b", choices=sorted(SHAPES))
    p.add_argument("--configs", default="a,b,c")
    p.add_argument("--which", default="ours,hf")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "msl_bench"))
    p.add_argument("--ours-mbs", default=None, help="micro-batch sizes ours tries in (a), e.g. 2 (default 4,2,1)")
    p.add_argument("--ours-extra", default="", help="more posttrain_gpt.py flags for ours, e.g. '--profile ...'")
    p.add_argument("--ours-recompute", default="",
                   help="ours' recompute flags in (b), (c) (default: full, uniform, 1 layer per checkpoint)")
    a = p.parse_args()
    import peft
    import transformers

    shape = SHAPES[a.model]
    peak = matmul_peak() if torch.cuda.is_available() else float("nan")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(json.dumps(dict(gpu=gpu, torch=torch.__version__,
                          transformers=transformers.__version__, peft=peft.__version__,
                          matmul_peak_tflops=round(peak, 1))), flush=True)
    model_dir = os.path.join(a.work, a.model)
    which = a.which.split(",")
    if "ours" in which:
        write_random_hf_model(shape, 4096, model_dir)
    ours_a = [int(m) for m in a.ours_mbs.split(",")] if a.ours_mbs else [4, 2, 1]
    plans = {"a": (4096, False, {"ours": ours_a, "hf": [2, 1]}),
             "b": (4096, True, {"ours": [1], "hf": [1]}),
             "c": (None, True, {"ours": [1], "hf": [1]})}
    results = {}
    for cfg_name in a.configs.split(","):
        seq, recompute, mbs_tries = plans[cfg_name]
        for w in which:
            for s in ([seq] if seq else [131072, 65536, 32768, 16384]):
                got = None
                for mbs in mbs_tries[w]:
                    got = measure(w, cfg_name, shape, s, mbs, recompute, a, model_dir, a.work, peak)
                    if "tokens_per_s" in got:
                        break
                if got and "tokens_per_s" in got:
                    results[(cfg_name, w)] = got
                    break
    print("\n| config | ours tokens/s | HF+PEFT tokens/s | ratio | ours peak GiB | HF peak GiB | ours MFU |")
    print("|---|---|---|---|---|---|---|")
    for cfg_name in a.configs.split(","):
        o, h = results.get((cfg_name, "ours")), results.get((cfg_name, "hf"))
        ratio = f"{o['tokens_per_s'] / h['tokens_per_s']:.2f}x" if o and h and o["seq"] == h["seq"] else "-"
        fmt = lambda r, k: (f"{r[k]}" + (f" (seq {r['seq']}, mbs {r['mbs']})" if k == "tokens_per_s" else "")  # noqa: E731
                            if r else "OOM/not run")
        print(f"| {cfg_name} | {fmt(o, 'tokens_per_s')} | {fmt(h, 'tokens_per_s')} | {ratio} | "
              f"{fmt(o, 'peak_gib')} | {fmt(h, 'peak_gib')} | {o['mfu'] if o else '-'} |")


if __name__ == "__main__":
    main()
