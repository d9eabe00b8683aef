"""Multi-GPU LoRA scaling with the real training script: data parallel 1 -> N and TP x PP vs one GPU.

Every run trains the same Qwen3-shaped model (random bf16 weights written once by bench/lora_throughput.py's
writer) on the same data with the same global batch (GBS micro-batches of 1 x seq), so the losses of the
first steps must agree within bf16 tolerance and tokens/s per GPU can be compared with the one-GPU run.

    python bench/scaling.py --layouts 1x1x1,1x1x4,2x2x1 [--model qwen3-8b] [--steps 6]

A layout is TPxPPxDP, with an ``f`` suffix for CCLoRA (--lora-fusion), e.g. 2x2x2f. Prints one JSON line per
run and a table: tokens/s, per GPU, efficiency vs one GPU (else vs the first layout that ran), and the largest
relative loss difference from that run over the steps.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lora_throughput import ROOT, SHAPES, write_random_data, write_random_hf_model  # noqa: E402

_LINE = re.compile(r"lm loss: ([0-9.E+-]+).*tokens/s: ([0-9.]+)")


def run(spec, a, model_dir, data):
    """One training run of layout ``spec``: TPxPPxDP, an ``f`` suffix adds --lora-fusion (CCLoRA)."""
    fusion = spec.endswith("f")
    tp, pp, dp = (int(x) for x in spec.rstrip("f").split("x"))
    n = tp * pp * dp
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}", "--master-port=29612",
           os.path.join(ROOT, "posttrain_gpt.py"), "--load", model_dir, "--data-path", data,
           "--is-instruction-dataset", "--seq-length", str(a.seq), "--micro-batch-size", "1",
           "--global-batch-size", str(a.gbs), "--train-iters", str(a.steps), "--bf16", "--lr", "1e-4",
           "--lr-decay-style", "constant", "--log-interval", "1", "--no-shuffle",
           "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
           "--lora-r", "16", "--lora-alpha", "32",
           "--lora-target-modules", "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    if tp > 1:
        cmd.append("--sequence-parallel")
    if fusion:
        cmd.append("--lora-fusion")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               CUDA_DEVICE_MAX_CONNECTIONS="1")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    rows = [_LINE.search(ln) for ln in out.stdout.splitlines()]
    rows = [(float(m.group(1)), float(m.group(2))) for m in rows if m]
    if out.returncode != 0 or len(rows) < a.steps:
        return dict(layout=spec, error=(out.stdout + out.stderr)[-1500:])
    toks = sorted(t for _, t in rows[2:])
    return dict(layout=spec, gpus=n, losses=[loss for loss, _ in rows],
                tokens_per_s=round(toks[len(toks) // 2]), tokens_per_s_per_gpu=round(toks[len(toks) // 2] / n))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen3-8b", choices=sorted(SHAPES))
    p.add_argument("--layouts", default="1x1x1,1x1x4,2x2x1")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--gbs", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "msl_bench"))
    a = p.parse_args()
    shape = SHAPES[a.model]
    model_dir = os.path.join(a.work, a.model)
    write_random_hf_model(shape, a.seq, model_dir)
    data = os.path.join(a.work, f"scale_{a.seq}")
    write_random_data(data, a.seq, a.gbs * (a.steps + 1), shape[-1])
    results = []
    for spec in a.layouts.split(","):
        r = run(spec, a, model_dir, data)
        print(json.dumps(r), flush=True)
        results.append(r)
    ran = [r for r in results if "error" not in r]
    base = next((r for r in ran if r["gpus"] == 1), ran[0] if ran else None)
    vs = "-" if base is None else "1 GPU" if base["gpus"] == 1 else base["layout"]
    print(f"\n| TPxPPxDP | GPUs | tokens/s | tokens/s per GPU | efficiency vs {vs} | max rel. loss diff vs {vs} |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['layout']} | - | failed | - | - | - |")
            continue
        eff = f"{r['tokens_per_s_per_gpu'] / base['tokens_per_s_per_gpu']:.0%}" if base else "-"
        diff = max(abs(x - y) / abs(y) for x, y in zip(r["losses"], base["losses"])) if base else float("nan")
        print(f"| {r['layout']} | {r['gpus']} | {r['tokens_per_s']} | {r['tokens_per_s_per_gpu']} | {eff} | "
              f"{diff:.2e} |")


if __name__ == "__main__":
    main()
