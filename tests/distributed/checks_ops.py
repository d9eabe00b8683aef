"""Fused ops on 2 gloo ranks (see test_ops.py): vocab-parallel fused linear cross-entropy, and a TP=2 model built
with the fused-ops spec hook.

Oracles: torch's cross_entropy on the full logits of the full weight, computed on every rank from the same
seed; HF transformers' logits for the model.
"""
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mindspeed_lora.checkpoint.hf_reader import HFCheckpointReader
from mindspeed_lora.checkpoint.weight_map import load_hf_weights
from mindspeed_lora.models.arch import ModelArch
from mindspeed_lora.models.builder import ModelOptions, ParallelOptions, build_gpt_model
from mindspeed_lora.models.family import read_hf_config
from mindspeed_lora.ops.cross_entropy import fused_linear_cross_entropy
from mindspeed_lora.ops.spec import FusedOpsConfig, fused_ops_spec_hook
from mindspeed_lora.parallel import initialize
from tests.fake_torch_npu import fake_torch_npu

S, B, H, V = 8, 3, 16, 64
TOL = 1e-5


def _ce_inputs(weight_grad):
    g = torch.Generator().manual_seed(21)
    hidden = torch.randn(S, B, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[1, :3] = -100
    upstream = torch.randn(B, S, generator=g)
    full = [hidden.clone().requires_grad_(), weight.clone().requires_grad_(weight_grad)]
    logits = (full[0] @ full[1].t()).permute(1, 2, 0)
    ref_loss = F.cross_entropy(logits, labels, ignore_index=-100, reduction="none")
    (ref_loss * upstream).sum().backward()
    return hidden, weight, labels, upstream, ref_loss.detach(), full[0].grad, full[1].grad


def _vocab_parallel_ce(sequence_parallel, weight_grad, impl):
    info = initialize(2, 1)
    hidden, weight, labels, upstream, ref_loss, ref_dh, ref_dw = _ce_inputs(weight_grad)
    rows = slice(info.tp_rank * V // 2, (info.tp_rank + 1) * V // 2)
    seq = slice(info.tp_rank * S // 2, (info.tp_rank + 1) * S // 2) if sequence_parallel else slice(None)
    h = hidden[seq].clone().requires_grad_()
    w = weight[rows].clone().requires_grad_(weight_grad)
    loss = fused_linear_cross_entropy(h, w, labels, sequence_parallel=sequence_parallel, chunk_size=5,
                                      force_impl=impl)
    (loss * upstream).sum().backward()
    torch.testing.assert_close(loss, ref_loss, atol=TOL, rtol=TOL)
    torch.testing.assert_close(h.grad, ref_dh[seq], atol=TOL, rtol=TOL)
    if weight_grad:
        torch.testing.assert_close(w.grad, ref_dw[rows], atol=TOL, rtol=TOL)


def check_vocab_parallel_ce(tmp):
    for weight_grad in (True, False):
        _vocab_parallel_ce(sequence_parallel=False, weight_grad=weight_grad, impl="npu")


def check_vocab_parallel_ce_sequence_parallel(tmp):
    for weight_grad in (True, False):
        _vocab_parallel_ce(sequence_parallel=True, weight_grad=weight_grad, impl="npu")


def check_vocab_parallel_ce_reference(tmp):
    _vocab_parallel_ce(sequence_parallel=True, weight_grad=True, impl="reference")


def _hf_dir(tmp):
    from tests.unit.test_inference import build_lively_model

    path = os.path.join(tmp, "qwen3")
    if dist.get_rank() == 0:
        build_lively_model("qwen3", path, seed=6)
    dist.barrier()
    return path


def _tp2_model_logits(tmp, sequence_parallel, impl):
    from megatron.core import parallel_state as ps
    from transformers import AutoModelForCausalLM

    hf_dir = _hf_dir(tmp)
    info = initialize(2, 1, seed=3)
    arch = ModelArch.from_hf_config(read_hf_config(hf_dir))
    par = ParallelOptions(tensor_model_parallel_size=2, sequence_parallel=sequence_parallel)
    cfg = FusedOpsConfig(use_fused_rmsnorm=True, use_fused_swiglu=True, use_fused_rotary_pos_emb=True,
                         use_flash_attn=True, force_impl=impl)
    model = build_gpt_model(arch, par, ModelOptions(spec_hooks=[fused_ops_spec_hook(cfg)]), pre_process=True,
                            post_process=True)
    load_hf_weights(model, HFCheckpointReader(hf_dir), arch, par, info.tp_rank, 0)
    ids = torch.randint(0, arch.vocab_size, (2, 16), generator=torch.Generator().manual_seed(8))
    pos = torch.arange(16).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        local = model.eval()(ids, pos, None)
        parts = [torch.empty_like(local) for _ in range(2)]
        dist.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
        ours = torch.cat(parts, dim=-1)
        expected = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()(ids).logits
    err = (ours - expected).abs().max()
    assert err < 1e-4, f"TP=2 sp={sequence_parallel} impl={impl}: max |logit diff| {err:.2e}"


def check_tp2_fused_model_matches_hf(tmp):
    _tp2_model_logits(tmp, sequence_parallel=False, impl="reference")


def check_tp2_sequence_parallel_fused_model_matches_hf(tmp):
    _tp2_model_logits(tmp, sequence_parallel=True, impl="reference")


def check_tp2_fused_model_npu_kernels_match_hf(tmp):
    with fake_torch_npu():
        _tp2_model_logits(tmp, sequence_parallel=True, impl="npu")
