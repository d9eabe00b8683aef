"""Fused ops on one GPU: forward+backward time and peak memory of our CUDA path vs the torch reference (eager)
and vs the plain SDPA backends for attention, in one run, Qwen3-8B layer shapes (bf16, micro-batch 1).

    python bench/fused_ops.py [--seq 4096] [--iters 20]

Prints one row per op and implementation: wall and GPU-kernel milliseconds per forward+backward, peak memory
above the inputs, and the ratios reference / ours (>1: ours faster). Not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from mindspeed_lora.ops.attention import attention
from mindspeed_lora.ops.cross_entropy import fused_linear_cross_entropy
from mindspeed_lora.ops.rms_norm import rms_norm
from mindspeed_lora.ops.rope import apply_rotary_emb, rope_cos_sin
from mindspeed_lora.ops.swiglu import swiglu

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 4096, 32, 8, 128, 12288, 151936


def measure(fn, inputs, iters):
    """(wall ms per forward+backward, GPU kernel ms per forward+backward, peak MiB above the inputs).

    Wall time includes the Python launch overhead, which a small op on its own cannot hide; kernel time (the
    profiler's sum of device time) is what the op costs inside a model whose GPU work keeps the CPU ahead.
    """
    def step():
        leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
        out = fn(*leaves)
        out.backward(torch.ones_like(out) if out.dim() else None)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    end.record()
    torch.cuda.synchronize()
    wall = start.elapsed_time(end) / iters
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    kernel_us = sum(getattr(e, "self_device_time_total", 0) for e in prof.key_averages())
    return wall, kernel_us / 1000 / iters, peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--iters", type=int, default=20)
    a = p.parse_args(argv)
    dev, bf16, s = "cuda", torch.bfloat16, a.seq
    torch.manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev) * scale).to(bf16)

    x = rand(s, 1, HIDDEN)
    w = rand(HIDDEN)
    gate_up = rand(s, 1, 2 * FFN)
    inv = 1.0 / (1e6 ** (torch.arange(0, HEAD_DIM, 2, device=dev).float() / HEAD_DIM))
    angles = torch.outer(torch.arange(s, device=dev).float(), inv)
    freqs = torch.cat((angles, angles), -1)[:, None, None, :]
    cos, sin = rope_cos_sin(freqs, s, dtype=bf16)
    q, k, v = rand(s, 1, HEADS, HEAD_DIM), rand(s, 1, KV_HEADS, HEAD_DIM), rand(s, 1, KV_HEADS, HEAD_DIM)
    lengths = [s // 8] * 8
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    qp, kp, vp = q[:, 0], k[:, 0], v[:, 0]
    weight = rand(VOCAB, HIDDEN, scale=0.02)
    labels = torch.randint(0, VOCAB, (1, s), device=dev)

    def sdpa(backend):
        from torch.nn.attention import sdpa_kernel

        def run(q, k, v):
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3),
                                                     v.permute(1, 2, 0, 3), is_causal=True, enable_gqa=True)
            return out.permute(2, 0, 1, 3)
        return run

    from torch.nn.attention import SDPBackend

    rows = [
        ("rms_norm [s,1,4096]", [x, w], {
            "ours": lambda x, w: rms_norm(x, w, 1e-6, force_impl="cuda"),
            "reference": lambda x, w: rms_norm(x, w, 1e-6, force_impl="reference")}),
        ("swiglu [s,1,2*12288]", [gate_up], {
            "ours": lambda t: swiglu(t, force_impl="cuda"),
            "reference": lambda t: swiglu(t, force_impl="reference")}),
        ("rope q [s,1,32,128]", [q], {
            "ours": lambda t: apply_rotary_emb(t, cos, sin, force_impl="cuda"),
            "reference": lambda t: apply_rotary_emb(t, cos, sin, force_impl="reference")}),
        ("attention causal GQA 32/8", [q, k, v], {
            "ours": lambda q, k, v: attention(q, k, v, force_impl="cuda"),
            "sdpa flash": sdpa(SDPBackend.FLASH_ATTENTION),
            "sdpa cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
            "reference": lambda q, k, v: attention(q, k, v, force_impl="reference")}),
        ("attention packed 8 seqs", [qp, kp, vp], {
            "ours": lambda q, k, v: attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_kv=cu, force_impl="cuda"),
            "reference": lambda q, k, v: attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                                   force_impl="reference")}),
        ("linear CE v=151936 (W frozen)", [x], {
            "ours": lambda h: fused_linear_cross_entropy(h, weight, labels, tp_group=None, force_impl="cuda").sum(),
            "ours, torch chunks": lambda h: fused_linear_cross_entropy(h, weight, labels, tp_group=None,
                                                                       force_impl="npu").sum(),
            "reference": lambda h: fused_linear_cross_entropy(h, weight, labels, tp_group=None,
                                                              force_impl="reference").sum()}),
        ("linear CE v=151936 (W trained)", [x, weight], {
            "ours": lambda h, w: fused_linear_cross_entropy(h, w, labels, tp_group=None, force_impl="cuda").sum(),
            "reference": lambda h, w: fused_linear_cross_entropy(h, w, labels, tp_group=None,
                                                                 force_impl="reference").sum()}),
    ]
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} seq {s} bf16, forward+backward")
    print(f"{'op':32} {'impl':18} {'wall ms':>8} {'kernel ms':>9} {'peak MiB':>9} {'ref/ours wall':>14} "
          f"{'ref/ours kernel':>16}")
    for name, inputs, impls in rows:
        timings = {}
        for impl, fn in impls.items():
            try:
                timings[impl] = measure(fn, inputs, a.iters)
            except Exception as e:  # a backend this GPU/torch lacks: report it, keep going
                print(f"{name:32} {impl:18} unavailable: {type(e).__name__}: {str(e)[:60]}")
        ref = timings.get("reference")
        for impl, (wall, kernel, mib) in timings.items():
            wall_ratio = kernel_ratio = ""
            if ref is not None and impl != "reference":
                wall_ratio, kernel_ratio = f"{ref[0] / wall:.2f}x", f"{ref[1] / kernel:.2f}x"
            print(f"{name:32} {impl:18} {wall:8.3f} {kernel:9.3f} {mib:9.0f} {wall_ratio:>14} {kernel_ratio:>16}")


if __name__ == "__main__":
    main()
