"""Megatron-vs-HF parity checks run on 2 gloo ranks (see test_models.py).

Oracle: HF transformers on the same random weights, fp32. Every rank builds the HF model from the same seed,
so each can compare its own result. Gradients are compared with HF's after merging megatron's TP shards
back into HF layout, and TP=2 grads with TP=1 grads (TP=1 runs on both ranks as DP=2).
"""
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mindspeed_lora import tiny
from mindspeed_lora.checkpoint.hf_reader import HFCheckpointReader
from mindspeed_lora.checkpoint.sharding import merge_shards
from mindspeed_lora.checkpoint.weight_map import load_hf_weights, stage_rules
from mindspeed_lora.models.arch import ModelArch
from mindspeed_lora.models.builder import ParallelOptions, build_gpt_model
from mindspeed_lora.models.family import read_hf_config
from mindspeed_lora.parallel import initialize

SEQ, BATCH = 16, 2
LOGIT_TOL = 1e-4
GRAD_REL_TOL = 1e-5


def _hf_dir(tmp, family):
    path = os.path.join(tmp, family)
    if dist.get_rank() == 0:
        tiny.build_hf_model(family, path, seed=7)
    dist.barrier()
    return path


def _inputs(vocab):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    return ids, labels


def _gather_tp(t, dim):
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    n = ps.get_tensor_model_parallel_world_size()
    if n == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def run_megatron(hf_dir, tp, pp, sp, backward):
    """Logits [b, s, v] (on the last stage, else None) and, if ``backward``, HF-layout grads of this stage."""
    from megatron.core import parallel_state as ps

    info = initialize(tp, pp, seed=11)
    arch = ModelArch.from_hf_config(read_hf_config(hf_dir))
    par = ParallelOptions(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sp)
    model = build_gpt_model(arch, par, pre_process=info.is_first_stage, post_process=info.is_last_stage)
    load_hf_weights(model, HFCheckpointReader(hf_dir), arch, par, info.tp_rank, info.pp_rank)
    ids, labels = _inputs(arch.vocab_size)
    pos = torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1)
    recv = None
    if not info.is_first_stage:
        shape = (SEQ // tp if par.sequence_parallel else SEQ, BATCH, arch.hidden_size)
        recv = torch.empty(shape)
        dist.recv(recv, src=ps.get_pipeline_model_parallel_prev_rank())
        recv.requires_grad_(backward)
        model.set_input_tensor(recv)
    with torch.set_grad_enabled(backward):
        out = model(ids, pos, None)
        logits = loss = None
        if info.is_last_stage:
            logits = torch.cat(_gather_tp(out.detach(), dim=-1), dim=-1)
            if backward:
                per_token = model(ids, pos, None, labels=labels) if recv is None else None
                if per_token is None:  # last stage of PP: rerun on the received activations
                    model.set_input_tensor(recv)
                    per_token = model(ids, pos, None, labels=labels)
                loss = per_token.float().mean()
        else:
            dist.send(out.detach().contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
    grads = None
    if backward:
        if info.is_last_stage:
            loss.backward()
            if recv is not None:
                dist.send(recv.grad.contiguous(), dst=ps.get_pipeline_model_parallel_prev_rank())
        else:
            g = torch.empty_like(out)
            dist.recv(g, src=ps.get_pipeline_model_parallel_next_rank())
            out.backward(g)
        grads = _hf_grads(model, arch, par, info.pp_rank)
    return logits, grads, info


def _hf_grads(model, arch, par, pp_rank):
    """This stage's weight grads merged over TP into HF names (linear weights and embeddings only: under SP
    the norm-weight grads are partial per rank until megatron's finalize_model_grads reduces them)."""
    params = dict(model.named_parameters())
    out = {}
    for key, rule in stage_rules(arch, par, pp_rank).items():
        if rule.kind == "replicated":
            continue
        g = params[key].grad
        if arch.tie_word_embeddings and par.pipeline_model_parallel_size > 1 and rule.kind == "vocab":
            # The first and last stages each hold a copy of the tied embedding; the true gradient is
            # their sum, which megatron's finalize_model_grads forms over the embedding group.
            from megatron.core import parallel_state as ps

            g = g.clone()
            dist.all_reduce(g, group=ps.get_embedding_group())
        shards = _gather_tp(g, dim=0)
        merged = merge_shards(rule.kind, shards, num_heads=arch.num_attention_heads,
                              num_groups=arch.num_query_groups, head_dim=arch.kv_channels)
        for name, t in zip(rule.hf_names, merged):
            out[name] = t
    return out


def hf_reference(hf_dir, backward):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids, labels = _inputs(model.config.vocab_size)
    logits = model(ids).logits
    grads = None
    if backward:
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        if model.config.tie_word_embeddings:
            grads["lm_head.weight"] = grads["model.embed_tokens.weight"]
    return logits.detach(), grads


def _logit_parity(tmp, family, tp, pp, sp):
    hf_dir = _hf_dir(tmp, family)
    ref, _ = hf_reference(hf_dir, backward=False)
    logits, _, info = run_megatron(hf_dir, tp, pp, sp, backward=False)
    if info.is_last_stage:
        diff = (logits - ref).abs().max().item()
        assert diff < LOGIT_TOL, f"{family} tp={tp} pp={pp} sp={sp}: max |logit diff| {diff:.3e}"


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _check_grads(hf_grads, grads, label):
    assert grads, f"{label}: no grads"
    for name, g in grads.items():
        ref = hf_grads[name]
        err = _rel(g, ref)
        assert err < GRAD_REL_TOL, f"{label}: grad of {name} differs from HF by {err:.2e} (relative)"


def _grad_parity(tmp, family, tp, pp, sp):
    """TP/PP grads vs HF and vs the TP=1 run, for every linear weight and the embeddings."""
    hf_dir = _hf_dir(tmp, family)
    _, hf_grads = hf_reference(hf_dir, backward=True)
    _, ref_grads, _ = run_megatron(hf_dir, 1, 1, False, backward=True)
    _check_grads(hf_grads, ref_grads, f"{family} tp=1")
    logits, grads, info = run_megatron(hf_dir, tp, pp, sp, backward=True)
    _check_grads(hf_grads, grads, f"{family} tp={tp} pp={pp} sp={sp}")
    chosen = "model.layers.0.self_attn.q_proj.weight" if info.is_first_stage else "model.layers.1.mlp.up_proj.weight"
    err = _rel(grads[chosen], ref_grads[chosen])
    assert err < GRAD_REL_TOL, f"{family}: {chosen} grad at tp={tp} vs tp=1 differs by {err:.2e}"


def _make(kind, family, tp, pp, sp):
    fn = _logit_parity if kind == "logits" else _grad_parity
    return lambda tmp: fn(tmp, family, tp, pp, sp)


for _family in ("qwen3", "llama3", "qwen2"):
    for _tp, _pp, _sp, _tag in ((1, 1, False, "tp1"), (2, 1, False, "tp2"), (2, 1, True, "tp2_sp"),
                                (1, 2, False, "pp2")):
        globals()[f"check_logits_{_family}_{_tag}"] = _make("logits", _family, _tp, _pp, _sp)
    for _tp, _pp, _sp, _tag in ((2, 1, False, "tp2"), (2, 1, True, "tp2_sp"), (1, 2, False, "pp2")):
        globals()[f"check_grads_{_family}_{_tag}"] = _make("grads", _family, _tp, _pp, _sp)
