"""Conversion time and memory: a Qwen3-8B-shaped random checkpoint, hf -> mg (TP2 PP2) -> hf.

Each conversion runs in its own child process, which samples its resident set (VmRSS, split into anonymous
and file-backed pages) every 20 ms and reports the kernel's peak (VmHWM); the figure is peak RSS as a
fraction of the model's bytes (target <= 25%). The round trip is then checked bit for bit, tensor by tensor.

Peer, same run: a load-everything converter (all HF tensors in memory, then each Megatron shard built and
torch.save'd; back: all shards loaded, merged, one safetensors save), on a cut-down model (``--peer-layers``)
so that it cannot exhaust this machine's memory; ours runs on the same cut-down model for the ratio.

    python bench/convert_memory.py                 # 36 layers (16.4 GB in bf16; needs ~50 GB of disk)
    python bench/convert_memory.py --layers 8      # when disk or time is short
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

QWEN3_8B = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False)


# ---------------------------------------------------------------------------------------------- child side

class RssSampler:
    """Peak VmRSS / RssAnon / RssFile of this process, sampled on a thread."""

    def __init__(self, every: float = 0.02):
        self.peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    @staticmethod
    def status() -> dict[str, int]:
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
        return out

    def _run(self, every):
        while not self._stop.is_set():
            s = self.status()
            for k in self.peak:
                self.peak[k] = max(self.peak[k], s.get(k, 0))
            time.sleep(every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def child(a) -> None:
    import torch

    from mindspeed_lora.arguments.convert import ConvertConfig
    from mindspeed_lora.checkpoint.convert import convert

    base = RssSampler.status()["VmRSS"]
    with RssSampler() as sampler:
        t0 = time.time()
        if a.child in ("hf2mg", "mg2hf"):
            load_type, save_type = a.child.split("2")
            convert(ConvertConfig(load_model_type=load_type, save_model_type=save_type, load_dir=a.load,
                                  save_dir=a.save, target_tp=a.tp, target_pp=a.pp, progress=False))
        elif a.child == "peer_hf2mg":
            peer_hf_to_mg(a.load, a.save, a.tp, a.pp)
        else:
            peer_mg_to_hf(a.load, a.save)
        wall = time.time() - t0
    end = RssSampler.status()
    print(json.dumps({"wall_s": wall, "vm_hwm": end["VmHWM"], "baseline_rss": base, **sampler.peak,
                      "torch_threads": torch.get_num_threads()}))


def peer_hf_to_mg(load, save, tp, pp):
    """Everything in memory, as a converter that loads the whole HF model first does."""
    import torch
    from safetensors.torch import load_file

    from mindspeed_lora.checkpoint import megatron_io
    from mindspeed_lora.checkpoint.sharding import read_shard
    from mindspeed_lora.checkpoint.sources import DictSource
    from mindspeed_lora.checkpoint.weight_map import stage_rules
    from mindspeed_lora.models.arch import ModelArch
    from mindspeed_lora.models.builder import ParallelOptions
    from mindspeed_lora.models.family import read_hf_config

    arch = ModelArch.from_hf_config(read_hf_config(load))
    index = json.load(open(os.path.join(load, "model.safetensors.index.json")))
    tensors = {}
    for f in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(os.path.join(load, f)))
    src = DictSource(tensors)
    par = ParallelOptions(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    kw = dict(num_heads=arch.num_attention_heads, num_groups=arch.num_query_groups, head_dim=arch.kv_channels)
    for stage in range(pp):
        rules = stage_rules(arch, par, stage)
        for rank in range(tp):
            sd = {k: read_shard(r.kind, r.hf_names, [src.shape(n) for n in r.hf_names], src.read, rank, tp, **kw)
                  .clone() for k, r in rules.items()}
            path = megatron_io.shard_path(os.path.join(save, "iter_0000001"), rank, stage, pp)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save({"model": sd, "iteration": 1}, path)
            del sd
    megatron_io.write_metadata(save, {"arch": arch.to_dict(), "tensor_model_parallel_size": tp,
                                      "pipeline_model_parallel_size": pp, "num_layer_list": None,
                                      "params_dtype": "bfloat16", "lora": None, "iteration": 1})
    megatron_io.atomic_write_text(os.path.join(save, megatron_io.LATEST), "1")


def peer_mg_to_hf(load, save):
    import torch
    from safetensors.torch import save_file

    from mindspeed_lora.checkpoint.sharding import merge_shards
    from mindspeed_lora.checkpoint.sources import MegatronCheckpoint

    ckpt = MegatronCheckpoint(load)
    shards = {(t, p): torch.load(ckpt.shard(t, p).path, weights_only=True)["model"]
              for t in range(ckpt.tp) for p in range(ckpt.pp)}
    arch = ckpt.arch
    kw = dict(num_heads=arch.num_attention_heads, num_groups=arch.num_query_groups, head_dim=arch.kv_channels)
    out = {}
    from mindspeed_lora.checkpoint.weight_map import stage_rules

    for p in range(ckpt.pp):
        for key, rule in stage_rules(arch, ckpt.parallel, p).items():
            parts = merge_shards(rule.kind, [shards[(t, p)][key] for t in range(ckpt.tp)], **kw)
            out.update({n: t.contiguous() for n, t in zip(rule.hf_names, parts)})
    os.makedirs(save, exist_ok=True)
    save_file(out, os.path.join(save, "model.safetensors"))


# ---------------------------------------------------------------------------------------------- parent side

def make_random_checkpoint(path: str, layers: int, seed: int = 0) -> int:
    """A random bf16 Qwen3-8B-shaped HF dir (config from QWEN3_8B with ``layers`` layers), written one tensor
    at a time; returns the model's bytes."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from mindspeed_lora import tiny
    from mindspeed_lora.checkpoint.hf_writer import SafetensorsWriter, TensorPlan, write_hf_config

    cfg = transformers.Qwen3Config(**{**QWEN3_8B, "num_hidden_layers": layers})
    with torch.device("meta"):
        shapes = [(n, tuple(p.shape)) for n, p in AutoModelForCausalLM.from_config(cfg).named_parameters()]
    os.makedirs(path, exist_ok=True)
    plan = [TensorPlan(n, s, torch.bfloat16) for n, s in shapes]
    writer = SafetensorsWriter(path, plan, max_shard_bytes=4 * 10**9)
    # Random values from one 64M-entry block, each tensor from its own random offset: fast on 2 cores,
    # and no two tensors (or rows) alike, so a misplaced slice still breaks the bit-for-bit check.
    g = torch.Generator().manual_seed(seed)
    block = (0.02 * torch.randn(2**26 + 4099, generator=g)).to(torch.bfloat16)
    for p in plan:
        n = 1
        for d in p.shape:
            n *= d
        t = torch.empty(n, dtype=torch.bfloat16)
        start = int(torch.randint(0, 4099, (1,), generator=g))
        for a in range(0, n, 2**26):
            m = min(2**26, n - a)
            t[a:a + m] = block[start:start + m]
        if len(p.shape) == 1:  # norm weights near 1
            t += 1
        writer.write(p.name, t.view(p.shape))
        del t
    writer.close()
    writer.write_index()
    write_hf_config(path, cfg.to_dict(), "bfloat16")
    tiny.build_tokenizer(path)
    return writer.total_size


def run_child(kind: str, load: str, save: str, tp: int = 1, pp: int = 1) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--load", load, "--save", save,
           "--tp", str(tp), "--pp", str(pp)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if p.returncode != 0:
        raise RuntimeError(f"{kind} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def verify_same(a: str, b: str) -> int:
    """Every tensor of HF dir ``b`` equals ``a``'s, bit for bit; returns how many were compared."""
    import torch

    from mindspeed_lora.checkpoint.sources import HFSource

    sa, sb = HFSource(a), HFSource(b)
    if sorted(sa.keys()) != sorted(sb.keys()):
        raise AssertionError("tensor names differ")
    for name in sa.keys():
        x, y = sa.read(name), sb.read(name)
        if x.dtype != y.dtype or not torch.equal(x, y):
            raise AssertionError(f"{name} differs")
    return len(sa.keys())


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def report(label: str, r: dict, model_bytes: int) -> str:
    return (f"{label:<34} wall {r['wall_s']:7.1f} s   peak RSS {gb(r['vm_hwm'])} = {r['vm_hwm'] / model_bytes:6.1%} of "
            f"the model (anon {gb(r['RssAnon'])}, file-backed {gb(r['RssFile'])}; at start {gb(r['baseline_rss'])})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=36, help="decoder layers of the Qwen3-8B-shaped model")
    p.add_argument("--peer-layers", type=int, default=4, help="layers of the cut-down model both converters run")
    p.add_argument("--workdir", default="/tmp/convert_memory_bench")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--load", default=None, help=argparse.SUPPRESS)
    p.add_argument("--save", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return child(a)

    os.makedirs(a.workdir, exist_ok=True)
    free = shutil.disk_usage(a.workdir).free
    model_est = 2 * (2 * QWEN3_8B["vocab_size"] * 4096 + a.layers * 192_954_368)
    print(f"disk free at {a.workdir}: {gb(free)}; model ~{gb(model_est)}, the round trip needs ~{gb(3 * model_est)}")
    if free < 3 * model_est * 1.1:
        sys.exit(f"not enough disk for {a.layers} layers; pass --layers N (each layer is ~0.39 GB in bf16)")

    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB RAM")
    results = {}
    for layers, who in ((a.peer_layers, ("ours", "peer")), (a.layers, ("ours",))):
        hf = os.path.join(a.workdir, f"hf_{layers}")
        t0 = time.time()
        model_bytes = make_random_checkpoint(hf, layers)
        print(f"\n{layers}-layer Qwen3-8B-shaped random bf16 checkpoint: {gb(model_bytes)} "
              f"(written in {time.time() - t0:.0f} s)")
        for name in who:
            prefix = "" if name == "ours" else "peer_"
            mg, back = os.path.join(a.workdir, f"mg_{name}_{layers}"), os.path.join(a.workdir, f"back_{name}_{layers}")
            r1 = run_child(prefix + "hf2mg", hf, mg, a.tp, a.pp)
            print(report(f"{name} hf -> mg TP{a.tp} PP{a.pp}", r1, model_bytes))
            r2 = run_child(prefix + "mg2hf", mg, back)
            print(report(f"{name} mg -> hf", r2, model_bytes))
            t0 = time.time()
            n = verify_same(hf, back)
            print(f"{name}: round trip bit-identical over {n} tensors (checked in {time.time() - t0:.0f} s); "
                  f"megatron shards {gb(dir_bytes(mg))}")
            results[(name, layers)] = (r1, r2, model_bytes)
            if not a.keep:
                shutil.rmtree(mg)
                shutil.rmtree(back)
        if not a.keep:
            shutil.rmtree(hf)
    ours, peer = results[("ours", a.peer_layers)], results[("peer", a.peer_layers)]
    print(f"\n{a.peer_layers}-layer model, peer / ours: peak RSS hf -> mg "
          f"{peer[0]['vm_hwm'] / ours[0]['vm_hwm']:.1f}x, "
          f"mg -> hf {peer[1]['vm_hwm'] / ours[1]['vm_hwm']:.1f}x; wall hf -> mg "
          f"{peer[0]['wall_s'] / ours[0]['wall_s']:.2f}x, mg -> hf {peer[1]['wall_s'] / ours[1]['wall_s']:.2f}x")
    full = results[("ours", a.layers)]
    worst = max(full[0]["vm_hwm"], full[1]["vm_hwm"]) / full[2]
    print(f"{a.layers}-layer model: worst peak RSS {worst:.1%} of {gb(full[2])} (target <= 25%): "
          f"{'met' if worst <= 0.25 else 'NOT met'}")


if __name__ == "__main__":
    main()
