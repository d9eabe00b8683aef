"""LoRA under tensor and pipeline parallelism on 2 gloo ranks (see test_lora.py).

Oracle: the TP=1 run of the same model on every rank (itself checked against peft in tests/unit/test_lora.py).
Adapters are peft's (random nonzero B) in our layout, on all four target linears. Grads of replicated adapter
factors that see sequence-parallel activations are reduced with megatron's own finalize rule before comparing.
"""
import os

import torch
import torch.distributed as dist

from mindspeed_lora import tiny
from mindspeed_lora.checkpoint.hf_reader import HFCheckpointReader
from mindspeed_lora.checkpoint.weight_map import load_hf_weights
from mindspeed_lora.models.arch import ModelArch
from mindspeed_lora.models.builder import ModelOptions, ParallelOptions, build_gpt_model, layer_offset
from mindspeed_lora.models.family import read_hf_config
from mindspeed_lora.parallel import initialize
from tests import lora_fixtures as fx

SEQ, BATCH = 12, 2
ALL = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
TOL = 1e-5


def _hf_dir(tmp):
    path = os.path.join(tmp, "hf")
    if dist.get_rank() == 0:
        tiny.build_hf_model("qwen3", path, seed=17)
    dist.barrier()
    return path


def _peft_adapters(hf_dir, arch):
    return fx.peft_full(fx.peft_model(hf_dir, seed=2), arch)


def _inputs():
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 512, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, 512, (BATCH, SEQ), generator=g)
    return ids, labels, torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1)


def _cfg(**kw):
    from mindspeed_lora.lora import LoraConfig

    return LoraConfig(**{"r": fx.R, "alpha": fx.ALPHA, "target_modules": ALL, **kw})


def _build(hf_dir, tp, pp, sp, cfg, recompute=None):
    from mindspeed_lora.lora import lora_spec_hook, prepare_lora_model

    info = initialize(tp, pp, seed=11)
    arch = ModelArch.from_hf_config(read_hf_config(hf_dir))
    par = ParallelOptions(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sp)
    options = ModelOptions(spec_hooks=[lora_spec_hook(cfg)], recompute_granularity=recompute)
    model = build_gpt_model(arch, par, options, pre_process=info.is_first_stage, post_process=info.is_last_stage)
    load_hf_weights(model, HFCheckpointReader(hf_dir), arch, par, info.tp_rank, info.pp_rank)
    prepare_lora_model(model, seed=5)
    return model, arch, par, info


def _finalize_sp_grads(model):
    """megatron's own finalize step for TP-replicated params (sums grads marked ``sequence_parallel``)."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import _allreduce_non_tensor_model_parallel_grads

    class Chunk:  # what finalize_model_grads reads off a DDP-wrapped chunk
        ddp_config = DistributedDataParallelConfig()

        def __init__(self, module):
            self.module = module

    _allreduce_non_tensor_model_parallel_grads([Chunk(model)], model.config)


def _gather_vocab(t):
    from megatron.core import parallel_state as ps

    n = ps.get_tensor_model_parallel_world_size()
    if n == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def _run(hf_dir, tp, sp, cfg, adapters=None, seed=None):
    """(logits [b, s, v], loss, TP=1-layout adapter grads) of a TP-only run with the given adapters."""
    model, arch, par, _ = _build(hf_dir, tp, 1, sp, cfg)
    if adapters is not None:
        fx.load_adapters(model, adapters, 0, tp, dist.get_rank() % tp)
    ids, labels, pos = _inputs()
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        logits = _gather_vocab(model(ids, pos, None))
    loss = model(ids, pos, None, labels=labels).mean()
    loss.backward()
    _finalize_sp_grads(model)
    return logits, loss.detach(), fx.gather_full(model, 0, grads=True), model


def _tp_parity(tmp, sp):
    hf_dir = _hf_dir(tmp)
    arch = ModelArch.from_hf_config(read_hf_config(hf_dir))
    adapters = _peft_adapters(hf_dir, arch)
    ref_logits, ref_loss, ref_grads, _ = _run(hf_dir, 1, False, _cfg(), adapters)
    logits, loss, grads, model = _run(hf_dir, 2, sp, _cfg(), adapters)
    diff = (logits - ref_logits).abs().max().item()
    assert diff < TOL, f"tp=2 sp={sp}: max |logit diff| vs tp=1 {diff:.2e}"
    assert abs(loss - ref_loss) <= TOL * abs(ref_loss), (loss.item(), ref_loss.item())
    assert set(grads) == set(ref_grads) and len(grads) == 2 * len(ALL) * arch.num_layers
    for k, g in grads.items():
        assert ref_grads[k].abs().sum() > 0, k
        err = fx.rel(g, ref_grads[k])
        assert err < TOL, f"tp=2 sp={sp}: grad of {k} differs from tp=1 by {err:.2e} (relative)"
    # the TP attributes megatron's grad-norm and finalize read
    qkv = model.decoder.layers[0].self_attention.linear_qkv
    proj = model.decoder.layers[0].self_attention.linear_proj
    assert qkv.lora_b.tensor_model_parallel and proj.lora_a.tensor_model_parallel
    assert not hasattr(qkv.lora_a, "tensor_model_parallel") and not hasattr(proj.lora_b, "tensor_model_parallel")
    assert qkv.lora_a.sequence_parallel is sp and proj.lora_b.sequence_parallel is sp


def check_tp2_equals_tp1(tmp):
    _tp_parity(tmp, sp=False)


def check_tp2_sp_equals_tp1(tmp):
    _tp_parity(tmp, sp=True)


def check_init_is_the_same_at_tp1_tp2_and_pp2(tmp):
    hf_dir = _hf_dir(tmp)
    tp1, _, _, _ = _build(hf_dir, 1, 1, False, _cfg())
    ref = fx.gather_full(tp1, 0)
    tp2, _, _, _ = _build(hf_dir, 2, 1, True, _cfg())
    got = fx.gather_full(tp2, 0)
    assert set(got) == set(ref)
    for k, v in got.items():
        assert torch.equal(v, ref[k]), f"tp=2: {k}"
        assert (v.abs().sum() > 0) == (".lora_A." in k), k
    pp2, arch, par, info = _build(hf_dir, 1, 2, False, _cfg())
    got = fx.gather_full(pp2, layer_offset(arch, par, info.pp_rank))
    assert len(got) == len(ref) // 2
    for k, v in got.items():
        assert torch.equal(v, ref[k]), f"pp=2 stage {info.pp_rank}: {k}"


def check_replicated_factors_stay_in_sync_with_dropout(tmp):
    """With dropout, TP ranks must still compute identical grads for the factors they both hold.

    Megatron seeds the default generator alike on TP ranks and the model-parallel tracker per TP rank; the
    column layer without SP draws its mask from the former (x is replicated), the others from the latter.
    """
    from megatron.core import parallel_state as ps

    hf_dir = _hf_dir(tmp)
    arch = ModelArch.from_hf_config(read_hf_config(hf_dir))
    adapters = _peft_adapters(hf_dir, arch)
    group = ps.get_tensor_model_parallel_group
    for sp in (False, True):
        _, _, plain, _ = _run(hf_dir, 2, sp, _cfg(), adapters, seed=123)
        _, _, dropped, model = _run(hf_dir, 2, sp, _cfg(dropout=0.3), adapters, seed=123)
        assert all(fx.rel(dropped[k], plain[k]) > 1e-3 for k in plain), "dropout changed no grad"
        for name, p in model.named_parameters():
            if ".lora_" in name and not getattr(p, "tensor_model_parallel", False):
                other = p.grad.clone()
                dist.broadcast(other, src=dist.get_global_rank(group(), 0), group=group())
                assert torch.equal(p.grad, other), f"sp={sp}: {name} grad differs across TP ranks"


def _pp_run(hf_dir, pp, recompute, adapters):
    """Manual 2-stage pipeline (stage 0 sends activations, stage 1 returns their grad)."""
    from megatron.core import parallel_state as ps

    model, arch, par, info = _build(hf_dir, 1, pp, False, _cfg(), recompute=recompute)
    offset = layer_offset(arch, par, info.pp_rank)
    fx.load_adapters(model, adapters, offset, 1, 0)
    ids, labels, pos = _inputs()
    if pp == 1:
        model(ids, pos, None, labels=labels).mean().backward()
    elif info.is_first_stage:
        out = model(ids, pos, None)
        dist.send(out.detach().contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        g = torch.empty_like(out)
        dist.recv(g, src=ps.get_pipeline_model_parallel_next_rank())
        out.backward(g)
    else:
        recv = torch.empty(SEQ, BATCH, arch.hidden_size)
        dist.recv(recv, src=ps.get_pipeline_model_parallel_prev_rank())
        recv.requires_grad_()
        model.set_input_tensor(recv)
        model(ids, pos, None, labels=labels).mean().backward()
        dist.send(recv.grad.contiguous(), dst=ps.get_pipeline_model_parallel_prev_rank())
    return fx.gather_full(model, offset, grads=True)


def check_pp2_full_recompute_trains_adapters_on_both_stages(tmp):
    hf_dir = _hf_dir(tmp)
    arch = ModelArch.from_hf_config(read_hf_config(hf_dir))
    adapters = _peft_adapters(hf_dir, arch)
    ref = _pp_run(hf_dir, 1, None, adapters)
    got = _pp_run(hf_dir, 2, "full", adapters)
    assert len(got) == 2 * len(ALL) * (arch.num_layers // 2)
    for k, g in got.items():
        assert g.abs().sum() > 0, f"stage {dist.get_rank()}: {k} got a zero grad under full recompute"
        err = fx.rel(g, ref[k])
        assert err < TOL, f"pp=2 full recompute: grad of {k} differs from pp=1 by {err:.2e}"
