"""Converted checkpoints on 2 gloo ranks: each rank loads its own shard with ``checkpoint.loading`` into a
TP=2 or PP=2 megatron-core model, and the logits must equal HF transformers' on the source model (fp32).
With the LoRA layers of ``mindspeed_lora.lora``, a TP=2 LoRA checkpoint (written from the layout contract)
on top must equal the merged HF export. Run by test_convert.py in one torchrun launch.
"""
import importlib.util
import os

import torch
import torch.distributed as dist

from mindspeed_lora.arguments.convert import ConvertConfig
from mindspeed_lora.checkpoint import loading
from mindspeed_lora.checkpoint.convert import convert
from mindspeed_lora.models.builder import ModelOptions, ParallelOptions, build_gpt_model
from mindspeed_lora.parallel import initialize
from tests.convert_fixtures import arch_of, contract_shards, hf_tensors, random_adapter, tiny_hf, write_lora_checkpoint

SEQ, BATCH, TOL = 16, 2, 1e-4


def _run(load, save, load_type, save_type, **kw):
    convert(ConvertConfig(load_model_type=load_type, save_model_type=save_type, load_dir=str(load),
                          save_dir=str(save), progress=False, **kw))


def _prepare(tmp, family, **convert_kw):
    """Rank 0 builds the HF model and converts it; every rank gets the paths."""
    hf_dir, mg_dir = os.path.join(tmp, "hf"), os.path.join(tmp, "mg")
    if dist.get_rank() == 0:
        tiny_hf(family, hf_dir, seed=6, lively=True)
        _run(hf_dir, mg_dir, "hf", "mg", **convert_kw)
    dist.barrier()
    return hf_dir, mg_dir


def _ids(vocab):
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    return ids, torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1)


def _hf_logits(path, ids):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(ids).logits


def _tp_logits(model, ids, pos):
    from megatron.core import parallel_state as ps

    with torch.no_grad():
        out = model.eval()(ids, pos, None)
    parts = [torch.empty_like(out) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def check_tp2_checkpoint_loads_and_matches_hf(tmp):
    hf_dir, mg_dir = _prepare(tmp, "qwen2", target_tp=2)
    info = initialize(2, 1, seed=1)
    arch = loading.resolve_arch(mg_dir)
    par = ParallelOptions(tensor_model_parallel_size=2)
    model = build_gpt_model(arch, par, pre_process=True, post_process=True)
    loading.load_base_weights(model, mg_dir, arch, par, info.tp_rank, 0)
    ids, pos = _ids(arch.vocab_size)
    torch.testing.assert_close(_tp_logits(model, ids, pos), _hf_logits(hf_dir, ids), rtol=TOL, atol=TOL)


def check_pp2_uneven_checkpoint_loads_and_matches_hf(tmp):
    from megatron.core import parallel_state as ps

    hf_dir, mg_dir = _prepare(tmp, "llama3", target_pp=2, num_layer_list=[3, 1])
    info = initialize(1, 2, seed=1)
    arch = loading.resolve_arch(mg_dir)
    par = ParallelOptions(pipeline_model_parallel_size=2, num_layer_list=[3, 1])
    model = build_gpt_model(arch, par, pre_process=info.is_first_stage, post_process=info.is_last_stage).eval()
    loading.load_base_weights(model, mg_dir, arch, par, 0, info.pp_rank)
    ids, pos = _ids(arch.vocab_size)
    with torch.no_grad():
        if info.is_first_stage:
            dist.send(model(ids, pos, None).contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        else:
            hidden = torch.empty(SEQ, BATCH, arch.hidden_size)
            dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
            logits = model(ids, pos, None)
            torch.testing.assert_close(logits, _hf_logits(hf_dir, ids), rtol=TOL, atol=TOL)


def check_tp2_lora_checkpoint_on_lora_layers_matches_merged_export(tmp):
    if importlib.util.find_spec("mindspeed_lora.lora") is None:
        return  # the LoRA layers are not in this tree; test_convert_megatron covers the merge without them
    from mindspeed_lora.lora.spec import lora_spec_hook

    hf_dir, mg_dir = _prepare(tmp, "qwen3", target_tp=2)
    lora_dir, merged = os.path.join(tmp, "lora"), os.path.join(tmp, "merged")
    if dist.get_rank() == 0:
        arch = arch_of(hf_dir)
        adapter = random_adapter(hf_tensors(hf_dir), arch, 4, seed=3)
        write_lora_checkpoint(lora_dir, contract_shards(adapter, arch, 2, [arch.num_layers]), arch, 2,
                              [arch.num_layers], 4, 8)
        _run(mg_dir, merged, "mg", "hf", lora_load=lora_dir)
    dist.barrier()
    info = initialize(2, 1, seed=1)
    arch = loading.resolve_arch(mg_dir)
    par = ParallelOptions(tensor_model_parallel_size=2)
    cfg = loading.resolve_lora_config(lora_dir)
    model = build_gpt_model(arch, par, ModelOptions(spec_hooks=[lora_spec_hook(cfg)]), pre_process=True,
                            post_process=True)
    assert any(".lora_B." in k for k in model.state_dict())
    loading.load_base_weights(model, mg_dir, arch, par, info.tp_rank, 0)
    loading.load_lora_weights(model, lora_dir, cfg, par, info.tp_rank, 0)
    ids, pos = _ids(arch.vocab_size)
    torch.testing.assert_close(_tp_logits(model, ids, pos), _hf_logits(merged, ids), rtol=TOL, atol=TOL)
