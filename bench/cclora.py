"""CCLoRA (--lora-fusion) vs unfused LoRA: tokens/s of a LoRA-wrapped megatron transformer stack, one run.

    torchrun --nproc-per-node=2 bench/cclora.py [--layers 8] [--seq 4096] [--mbs 1] [--rank 16] [--iters 10]

Both variants are the same megatron-core decoder stack (Qwen3-8B layer shapes: hidden 4096, 32 heads, 8 kv
heads, head dim 128, ffn 12288; bf16; TP = the number of ranks, sequence parallel on), LoRA on linear_qkv,
linear_proj, linear_fc1 and linear_fc2, frozen base, identical weights; only ``LoraConfig.fusion`` differs.
A step is forward + backward of the stack on a [seq/TP, mbs, hidden] input (what a middle pipeline stage sees;
embedding, output layer and optimizer are left out: they do not change with CCLoRA). Variants are timed in
alternating rounds so clock or thermal drift hits both alike.

Prints per variant: median ms per step, tokens/s (seq x mbs per step; the TP ranks share those tokens), peak
memory; then the ratio fused / unfused (>1: CCLoRA faster) and the largest relative difference of the two
outputs (bf16: expect ~1e-2 from the merged-weight rounding). ``--shape tiny`` runs a small stack on CPU/gloo
to check the script itself. Not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

SHAPES = {  # family, hidden, heads, kv heads, head dim, ffn
    "qwen3-8b": ("qwen3", 4096, 32, 8, 128, 12288),
    "tiny": ("qwen3", 256, 4, 2, 64, 512),
}


def build(arch, parallel, lora_cfg, dtype, fused_ops, device_type, only=None):
    from mindspeed_lora.lora import lora_spec_hook, prepare_lora_model
    from mindspeed_lora.models.builder import ModelOptions, build_gpt_model
    from mindspeed_lora.ops.spec import FLAG_NAMES, FusedOpsConfig, fused_ops_spec_hook

    hooks = [lora_spec_hook(lora_cfg)]
    if fused_ops:
        chosen = {} if only is None else {name: name in only for name in FLAG_NAMES}
        hooks.append(fused_ops_spec_hook(FusedOpsConfig.for_device(device_type, **chosen)))
    options = ModelOptions(params_dtype=dtype, use_cpu_initialization=device_type == "cpu", spec_hooks=hooks)
    model = build_gpt_model(arch, parallel, options, pre_process=False, post_process=False)
    prepare_lora_model(model, seed=1)
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-8b")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--mbs", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=int, default=32)
    p.add_argument("--iters", type=int, default=10, help="timed steps per variant")
    p.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
    p.add_argument("--no-sequence-parallel", action="store_true")
    p.add_argument("--no-fused-ops", action="store_true", help="megatron's local attention/norms instead of ours")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--only-fused", default=None,
                   help="comma list of the fused ops left on (use_fused_rmsnorm, use_fused_swiglu, "
                        "use_fused_rotary_pos_emb, use_flash_attn); default all")
    p.add_argument("--sdpa-backend", default=None, choices=["flash", "cudnn", "efficient"],
                   help="restrict SDPA to one backend")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="capture each variant's forward and backward as CUDA graphs (torch.cuda."
                        "make_graphed_callables), so a step replays them without the host launching each op")
    p.add_argument("--profile-dir", default=None,
                   help="after timing, profile 2 steps of each variant on every rank: a trace and an op table")
    a = p.parse_args(argv)
    if a.sdpa_backend is None:
        return _run(a)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}[a.sdpa_backend]
    with sdpa_kernel(which):
        return _run(a)


def _run(a):
    from mindspeed_lora.accelerator import get_accelerator
    from mindspeed_lora.lora import LoraConfig
    from mindspeed_lora.models.arch import ModelArch
    from mindspeed_lora.models.builder import ParallelOptions
    from mindspeed_lora.parallel import initialize

    tp = int(os.environ.get("WORLD_SIZE", "1"))
    info = initialize(tp, 1, seed=1)
    acc = get_accelerator()
    dev = acc.device()
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    family, hidden, heads, kv, head_dim, ffn = SHAPES[a.shape]
    arch = ModelArch(family=family, num_layers=a.layers, hidden_size=hidden, ffn_hidden_size=ffn,
                     num_attention_heads=heads, num_query_groups=kv, kv_channels=head_dim, vocab_size=1024,
                     max_position_embeddings=max(a.seq, 4096), norm_eps=1e-6, rope_theta=1e6,
                     tie_word_embeddings=False)
    sp = tp > 1 and not a.no_sequence_parallel
    parallel = ParallelOptions(tensor_model_parallel_size=tp, sequence_parallel=sp)
    fused_ops = not a.no_fused_ops and acc.device_type != "cpu"

    models = {}
    only = None if a.only_fused is None else set(a.only_fused.split(","))
    for name, fusion in (("unfused", False), ("cclora", True)):
        cfg = LoraConfig(r=a.rank, alpha=a.alpha, target_modules=["all-linear"], fusion=fusion)
        models[name] = build(arch, parallel, cfg, dtype, fused_ops, acc.device_type, only).to(dev)
    # identical weights (base and adapters; B nonzero so the adapter path is not trivially zero)
    src = models["unfused"]
    with torch.no_grad():
        for n, p_ in src.named_parameters():
            if ".lora_B." in n:
                p_.normal_(0, 0.01)
    models["cclora"].load_state_dict(src.state_dict())

    gen = torch.Generator().manual_seed(info.tp_rank)  # this rank's sequence block of the input / output grad
    local_seq = a.seq // tp if sp else a.seq
    x = (torch.randn(local_seq, a.mbs, hidden, generator=gen) * 0.5).to(dev, dtype)
    grad = torch.randn(local_seq, a.mbs, hidden, generator=gen).to(dev, dtype)
    pos = torch.arange(a.seq, device=dev).unsqueeze(0).expand(a.mbs, -1)

    graphed, eager = {}, {}
    if a.cuda_graphs:
        if acc.device_type != "cuda":
            raise SystemExit("--cuda-graphs needs CUDA")
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        # the SP region forks megatron's RNG tracker: under capture only its graph-safe generators may be swapped
        model_parallel_cuda_manual_seed(1, use_cudagraphable_rng=True, force_reset_rng=True)
        for name, m in models.items():
            with torch.no_grad():
                eager[name] = _Stack(m, pos)(x).float()
            graphed[name] = torch.cuda.make_graphed_callables(_Stack(m, pos), (x.detach().requires_grad_(),))

    def step(model):
        inp = x.detach().requires_grad_()
        run = graphed.get(next(k for k, v in models.items() if v is model))
        if run is not None:
            out = run(inp)
        else:
            model.set_input_tensor(inp)
            out = model(None, pos, None)
        out.backward(grad)
        return out

    outs = {name: step(m).detach().float() for name, m in models.items()}
    diff = ((outs["cclora"] - outs["unfused"]).norm() / outs["unfused"].norm()).item()
    graph_diff = max(((outs[n] - eager[n]).norm() / eager[n].norm()).item() for n in eager) if eager else None
    for m in models.values():
        for _ in range(2):
            step(m)
    times = {name: [] for name in models}
    peaks = {}
    for _ in range(a.rounds):
        for name, m in models.items():
            acc.synchronize()
            if acc.device_type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(a.iters):
                step(m)
            acc.synchronize()
            times[name].append((time.perf_counter() - t0) / a.iters)
            if acc.device_type == "cuda":
                peaks[name] = torch.cuda.max_memory_allocated() / 2**30
    if a.profile_dir:
        _profile(models, step, a.profile_dir, info.rank, acc)
    if info.rank == 0:
        tokens = a.seq * a.mbs
        print(f"# {a.shape} x {a.layers} layers, TP={tp}, SP={sp}, seq {a.seq}, mbs {a.mbs}, LoRA r={a.rank} "
              f"all-linear, {a.dtype}, fused ops {'on' if fused_ops else 'off'}, device {acc.device_type}, "
              f"CUDA_DEVICE_MAX_CONNECTIONS={os.environ.get('CUDA_DEVICE_MAX_CONNECTIONS', 'unset')}"
              f"{', CUDA graphs' if graphed else ''}")
        print("| variant | ms/step (median) | tokens/s | peak GiB |")
        print("|---|---|---|---|")
        med = {}
        for name in models:
            med[name] = statistics.median(times[name])
            peak = f"{peaks[name]:.1f}" if name in peaks else "-"
            print(f"| {name} | {med[name] * 1e3:.2f} | {tokens / med[name]:,.0f} | {peak} |")
        print(f"ratio cclora / unfused tokens/s: {med['unfused'] / med['cclora']:.3f}x; "
              f"output relative difference {diff:.2e}"
              + (f"; graphed vs eager output {graph_diff:.2e}" if graph_diff is not None else ""))


class _Stack(torch.nn.Module):
    """The decoder stack as a one-tensor callable (what make_graphed_callables captures)."""

    def __init__(self, model, pos):
        super().__init__()
        self.model, self.pos = model, pos

    def forward(self, inp):
        self.model.set_input_tensor(inp)
        return self.model(None, self.pos, None)


def _profile(models, step, out_dir, rank, acc):
    os.makedirs(out_dir, exist_ok=True)
    for name, m in models.items():
        acc.synchronize()
        dist.barrier()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                step(m)
            acc.synchronize()
        prof.export_chrome_trace(os.path.join(out_dir, f"{name}_rank{rank}.json"))
        with open(os.path.join(out_dir, f"{name}_rank{rank}.txt"), "w") as f:
            f.write(prof.key_averages().table(sort_by="self_device_time_total", row_limit=40))


if __name__ == "__main__":
    main()
