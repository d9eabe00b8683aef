"""CCLoRA on 2 gloo ranks (see test_cclora.py).

Oracle: the unfused LoRA layers (themselves checked against peft and TP=1 in test_lora / checks_lora), built with
the same weights and inputs. Each of the five cases (TP=1, column / row parallel with and without SP) runs on
several random shapes, covering both sides of the merged-weight switch (tokens >= in_features). The NPU path
runs under the fake torch_npu and is compared with the generic path.
"""
import torch
import torch.distributed as dist

from mindspeed_lora.parallel import initialize
from tests import lora_fixtures as fx

REL = 1e-6


def _rank():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def _config(tp, sp, dtype=torch.float32):
    from megatron.core.model_parallel_config import ModelParallelConfig

    return ModelParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp, use_cpu_initialization=True,
                               params_dtype=dtype, bf16=dtype == torch.bfloat16)


def _layers(kind, in_f, out_f, r, bias, skip_bias_add, tp, sp, gen, dtype=torch.float32):
    """(unfused, fused) layers of ``kind`` with identical random weights (this rank's shards)."""
    from mindspeed_lora.lora import LoraColumnParallelLinear, LoraConfig, LoraRowParallelLinear

    rank, _ = _rank()
    w = torch.randn(out_f, in_f, generator=gen) / in_f ** 0.5
    a = torch.randn(r, in_f, generator=gen) / in_f ** 0.5
    b = torch.randn(out_f, r, generator=gen) * 0.5
    bvec = torch.randn(out_f, generator=gen)
    if kind == "column":
        cls, extra = LoraColumnParallelLinear, dict(gather_output=False)
        w, b, bvec = w.chunk(tp, 0)[rank], b.chunk(tp, 0)[rank], bvec.chunk(tp, 0)[rank]
    else:
        cls, extra = LoraRowParallelLinear, dict(input_is_parallel=True)
        w, a = w.chunk(tp, 1)[rank], a.chunk(tp, 1)[rank]
    out = []
    for fusion in (False, True):
        cfg = LoraConfig(r=r, alpha=2 * r, target_modules=["all-linear"], fusion=fusion)
        layer = cls(in_f, out_f, lora_config=cfg, config=_config(tp, sp, dtype), init_method=lambda t: None,
                    bias=bias, skip_bias_add=skip_bias_add, **extra)
        with torch.no_grad():
            layer.base_layer.weight.copy_(w)
            if bias:
                layer.base_layer.bias.copy_(bvec)
            layer.lora_a.copy_(a)
            layer.lora_b.copy_(b)
        out.append(layer)
    return out


def _io(kind, seq, batch, in_f, out_f, tp, sp, gen, dtype=torch.float32):
    """This rank's input and output-grad slices of full random tensors (the same on every rank)."""
    rank, _ = _rank()
    x = torch.randn(seq, batch, in_f, generator=gen)
    g = torch.randn(seq, batch, out_f, generator=gen)
    if kind == "column":
        x = x.chunk(tp, 0)[rank] if sp else x
        g = g.chunk(tp, 2)[rank]
    else:
        x = x.chunk(tp, 2)[rank]
        g = g.chunk(tp, 0)[rank] if sp else g
    return x.to(dtype), g.to(dtype)


def _run(layer, x, g):
    x = x.clone().requires_grad_()
    out, bias = layer(x)
    out.backward(g)
    return out.detach(), bias, x.grad, layer.lora_a.grad, layer.lora_b.grad


def _compare_case(kind, tp, sp, shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    branches = set()
    for seq, batch, in_f, out_f, r, bias, skip in shapes:
        unfused, fused = _layers(kind, in_f, out_f, r, bias, skip, tp, sp, gen)
        x, g = _io(kind, seq, batch, in_f, out_f, tp, sp, gen)
        ref, got = _run(unfused, x, g), _run(fused, x, g)
        label = f"{kind} tp={tp} sp={sp} shape s={seq} b={batch} in={in_f} out={out_f} r={r} bias={bias}/{skip}"
        for name, u, f in zip(("output", "bias", "x grad", "A grad", "B grad"), ref, got):
            if u is None:
                assert f is None, f"{label}: {name} should be None"
                continue
            assert u.shape == f.shape, f"{label}: {name} shape {tuple(f.shape)} vs {tuple(u.shape)}"
            err = fx.rel(f, u)
            assert err < REL, f"{label}: {name} differs from the unfused layer by {err:.2e} (relative)"
        tokens = seq * batch // (tp if (sp and kind == "column") else 1)
        branches.add(tokens >= (in_f // (tp if kind == "row" else 1)))
    return branches


def _shapes(gen, tp, n, tokens_vs_in):
    """``n`` random shapes; tokens_vs_in picks small (tokens < in) / large sizes alternately."""
    out = []
    for i in range(n):
        r = int(torch.randint(1, 9, (1,), generator=gen))
        batch = int(torch.randint(1, 4, (1,), generator=gen))
        seq = tp * int(torch.randint(1, 9, (1,), generator=gen))
        in_f = tp * int(torch.randint(4, 33, (1,), generator=gen))
        out_f = tp * int(torch.randint(4, 33, (1,), generator=gen))
        if tokens_vs_in and i % 2 == 0:
            in_f = tp * (seq * batch + int(torch.randint(1, 9, (1,), generator=gen)))  # tokens < in
        elif tokens_vs_in:
            in_f = tp * max(1, (seq * batch) // (2 * tp))  # tokens >= in
        bias = bool(i % 3 != 2)
        out.append((seq, batch, in_f, out_f, r, bias, bool(i % 2)))
    return out


def check_tp1_both_branches(tmp):
    initialize(1, 1, seed=3)
    gen = torch.Generator().manual_seed(100)
    for kind in ("column", "row"):
        branches = _compare_case(kind, 1, False, _shapes(gen, 1, 4, True), seed=1 + len(kind))
        assert branches == {True, False}, f"{kind}: merged and unmerged branches not both covered"


def check_column_no_sp(tmp):
    initialize(2, 1, seed=3)
    gen = torch.Generator().manual_seed(200)
    branches = _compare_case("column", 2, False, _shapes(gen, 2, 4, True), seed=5)
    assert branches == {True, False}


def check_column_sp(tmp):
    initialize(2, 1, seed=3)
    gen = torch.Generator().manual_seed(300)
    _compare_case("column", 2, True, _shapes(gen, 2, 4, False), seed=6)


def check_row_no_sp(tmp):
    initialize(2, 1, seed=3)
    gen = torch.Generator().manual_seed(400)
    _compare_case("row", 2, False, _shapes(gen, 2, 4, False), seed=7)


def check_row_sp(tmp):
    initialize(2, 1, seed=3)
    gen = torch.Generator().manual_seed(500)
    _compare_case("row", 2, True, _shapes(gen, 2, 4, False), seed=8)


class _Counting:
    """A torch_npu stand-in that counts calls of the fused ops and delegates to the fake module."""

    def __init__(self, module):
        self.module, self.calls = module, {}

    def __getattr__(self, name):
        fn = getattr(self.module, name)

        def wrapped(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*args, **kwargs)

        return wrapped


def _function_run(fn, comm, x, weight, a, b, g):
    x, a, b = (t.clone().requires_grad_() for t in (x, a, b))
    y = fn.apply(x, weight, a, b, 2.0, comm)
    y.backward(g)
    return y.detach(), x.grad, a.grad, b.grad


def check_npu_path_under_fake_torch_npu_equals_generic(tmp):
    """SP cases (the ones with fused ops): the NPU path calls both fused ops and matches the generic path; where
    a constraint fails (fp32, k < 256) it falls back without calling them and matches exactly."""
    from megatron.core import parallel_state as ps

    from mindspeed_lora.lora.cclora import (
        ColumnSequenceParallelLoRA,
        GenericCollectives,
        NpuCollectives,
        RowSequenceParallelLoRA,
    )
    from tests.fake_torch_npu import fake_torch_npu

    initialize(2, 1, seed=3)
    rank, tp = _rank()
    group = ps.get_tensor_model_parallel_group()
    gen = torch.Generator().manual_seed(600)
    seq, batch, r = 8, 2, 8
    cases = (  # (function, in, out): k of every fused call >= 256
        (ColumnSequenceParallelLoRA, "column", 256, 512),
        (RowSequenceParallelLoRA, "row", 512, 256),
    )
    with fake_torch_npu() as module:
        for dtype, expect_fused in ((torch.bfloat16, True), (torch.float32, False)):
            for fn, kind, in_f, out_f in cases:
                w = torch.randn(out_f, in_f, generator=gen) / in_f ** 0.5
                a = torch.randn(r, in_f, generator=gen) / in_f ** 0.5
                b = torch.randn(out_f, r, generator=gen) * 0.1
                if kind == "column":
                    w, b = w.chunk(tp, 0)[rank], b.chunk(tp, 0)[rank]
                else:
                    w, a = w.chunk(tp, 1)[rank], a.chunk(tp, 1)[rank]
                x, g = _io(kind, seq, batch, in_f, out_f, tp, True, gen, dtype)
                w, a, b = (t.to(dtype) for t in (w, a, b))
                counting = _Counting(module)
                npu = NpuCollectives(group, torch_npu=counting, hcom=module.fake_hccl_comm_name(group))
                got = _function_run(fn, npu, x, w, a, b, g)
                ref = _function_run(fn, GenericCollectives(group), x, w, a, b, g)
                label = f"{fn.__name__} {dtype}"
                if expect_fused:
                    assert counting.calls == {"npu_all_gather_base_mm": 1, "npu_mm_reduce_scatter_base": 1}, \
                        f"{label}: fused ops called {counting.calls}"
                    for name, u, f in zip(("output", "x grad", "A grad", "B grad"), ref, got):
                        err = fx.rel(f.float(), u.float())
                        assert err < 1e-2, f"{label}: {name} NPU path vs generic {err:.2e} (relative, bf16)"
                else:
                    assert counting.calls == {}, f"{label}: fused ops called for fp32: {counting.calls}"
                    for name, u, f in zip(("output", "x grad", "A grad", "B grad"), ref, got):
                        assert torch.equal(f, u), f"{label}: {name} of the fallback differs from generic"


def check_model_with_fusion_equals_unfused(tmp):
    """A tiny GPT (all four targets) at TP=2+SP and TP=2: CCLoRA logits and adapter grads equal the unfused run."""
    import os

    from mindspeed_lora import tiny
    from mindspeed_lora.checkpoint.hf_reader import HFCheckpointReader
    from mindspeed_lora.checkpoint.weight_map import load_hf_weights
    from mindspeed_lora.lora import LoraConfig, lora_seed, lora_spec_hook, prepare_lora_model
    from mindspeed_lora.models.arch import ModelArch
    from mindspeed_lora.models.builder import ModelOptions, ParallelOptions, build_gpt_model
    from mindspeed_lora.models.family import read_hf_config

    hf_dir = os.path.join(tmp, "hf")
    if dist.get_rank() == 0:
        tiny.build_hf_model("qwen2", hf_dir, seed=9)  # qwen2: qkv bias goes through the fused column path
    dist.barrier()
    arch = ModelArch.from_hf_config(read_hf_config(hf_dir))
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 512, (2, 8), generator=g)
    labels = torch.randint(0, 512, (2, 8), generator=g)
    pos = torch.arange(8).unsqueeze(0).expand(2, -1)
    for sp in (False, True):
        results = []
        for fusion in (False, True):
            info = initialize(2, 1, seed=11)
            par = ParallelOptions(tensor_model_parallel_size=2, sequence_parallel=sp)
            cfg = LoraConfig(r=4, alpha=8, target_modules=["all-linear"], fusion=fusion)
            model = build_gpt_model(arch, par, ModelOptions(spec_hooks=[lora_spec_hook(cfg)]), pre_process=True,
                                    post_process=True)
            load_hf_weights(model, HFCheckpointReader(hf_dir), arch, par, info.tp_rank, 0)
            prepare_lora_model(model, seed=5)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if ".lora_B." in n:  # nonzero B, the same in the fused and the unfused build
                        p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(lora_seed(n, 1))) * 0.1)
            loss = model(ids, pos, None, labels=labels).mean()
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if ".lora_" in n}
            results.append((loss.detach(), grads))
        (l0, g0), (l1, g1) = results
        assert abs(l1 - l0) <= 1e-6 * abs(l0), f"sp={sp}: loss {l1.item()} vs unfused {l0.item()}"
        for k in g0:
            err = fx.rel(g1[k], g0[k])
            assert err < 1e-5, f"sp={sp}: {k} grad with CCLoRA differs by {err:.2e} (relative)"
