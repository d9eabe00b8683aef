"""LoRA through convert_ckpt: merge to HF, PEFT adapter export and import, LoRA resharding.

The LoRA checkpoints here are written from the layout contract by ``tests/convert_fixtures.py`` (plain loops),
from an adapter drawn in HF terms (one A per fused linear, a B per HF module). Oracles: W + s * B_i @ A
computed on the HF tensors in fp32 (``merged_oracle``), peft's ``PeftModel.from_pretrained`` on the exported
adapter, and the contract's own shards for the re-imported adapter. Megatron with the adapter applied as
activations is the oracle in ``test_convert_megatron.py``.
"""
import json
import math
import os

import pytest
import torch

from mindspeed_lora.arguments.convert import ConvertConfig
from mindspeed_lora.checkpoint.convert import convert
from tests.convert_fixtures import (
    arch_of,
    contract_shards,
    hf_tensors,
    megatron_shard,
    merged_oracle,
    random_adapter,
    tiny_hf,
    write_lora_checkpoint,
)

R, ALPHA = 4, 8.0


def run(load, save, load_type, save_type, **kw):
    return convert(ConvertConfig(load_model_type=load_type, save_model_type=save_type, load_dir=str(load),
                                 save_dir=str(save), progress=False, **kw))


def setup_lora(tmp_path, family="qwen3", dtype="float32", base_layout=(2, 2, [1, 3]), lora_layout=(2, 2, [1, 3]),
               seed=0, use_rslora=False, adapter_dtype=torch.float32):
    """HF base, its Megatron conversion, a random adapter and its LoRA checkpoint."""
    hf_dir = str(tmp_path / "hf")
    tiny_hf(family, hf_dir, seed=seed, dtype=dtype, lively=True)
    tp, pp, nll = base_layout
    run(hf_dir, tmp_path / "mg", "hf", "mg", target_tp=tp, target_pp=pp, num_layer_list=nll)
    hf = hf_tensors(hf_dir)
    arch = arch_of(hf_dir)
    adapter = random_adapter(hf, arch, R, seed=seed + 1, dtype=adapter_dtype)
    ltp, lpp, lnll = lora_layout
    counts = lnll or [arch.num_layers // lpp] * lpp
    write_lora_checkpoint(str(tmp_path / "lora"), contract_shards(adapter, arch, ltp, counts), arch, ltp, counts,
                          R, ALPHA, use_rslora=use_rslora)
    return hf_dir, hf, arch, adapter


def assert_tensors_close(got: dict, want: dict, exact=False):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        if exact:
            assert torch.equal(got[k], want[k]), k
        else:
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6, msg=k)


@pytest.mark.parametrize("family", ["qwen3", "llama3", "qwen2"])
def test_merge_equals_fp32_merge_of_hf_weights(tmp_path, family):
    hf_dir, hf, arch, adapter = setup_lora(tmp_path, family)
    run(tmp_path / "mg", tmp_path / "merged", "mg", "hf", lora_load=str(tmp_path / "lora"))
    got = hf_tensors(str(tmp_path / "merged"))
    assert_tensors_close(got, merged_oracle(hf, adapter, ALPHA / R))
    changed = [k for k in hf if not torch.equal(hf[k], got[k])]
    assert len(changed) == 7 * arch.num_layers  # q k v o gate up down of every layer, nothing else


def test_merge_with_lora_in_another_layout_and_rslora(tmp_path):
    """The adapter's TP/PP layout need not be the base's; rsLoRA scales by alpha / sqrt(r)."""
    hf_dir, hf, arch, adapter = setup_lora(tmp_path, "llama3", lora_layout=(4, 1, None), use_rslora=True)
    run(tmp_path / "mg", tmp_path / "merged", "mg", "hf", lora_load=str(tmp_path / "lora"))
    assert_tensors_close(hf_tensors(str(tmp_path / "merged")), merged_oracle(hf, adapter, ALPHA / math.sqrt(R)))


def test_bf16_model_stays_bf16_after_merge(tmp_path):
    hf_dir, hf, arch, adapter = setup_lora(tmp_path, "qwen3", dtype="bfloat16", adapter_dtype=torch.bfloat16)
    run(tmp_path / "mg", tmp_path / "merged", "mg", "hf", lora_load=str(tmp_path / "lora"))
    got = hf_tensors(str(tmp_path / "merged"))
    assert json.load(open(tmp_path / "merged" / "config.json"))["dtype"] == "bfloat16"
    want = merged_oracle(hf, adapter, ALPHA / R, dtype=torch.bfloat16)  # fp32 merge, cast once
    assert_tensors_close(got, want, exact=True)
    # the oracle discriminates: merging in bf16 arithmetic rounds differently
    name = "model.layers.0.self_attn.q_proj.weight"
    ab = adapter[(0, "linear_qkv")]
    in_bf16 = hf[name] + (ALPHA / R) * (ab["B"][0] @ ab["A"])
    assert not torch.equal(in_bf16, got[name])


def test_merged_model_equals_peft_on_exported_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf_dir, hf, arch, adapter = setup_lora(tmp_path, "qwen2")
    run(tmp_path / "mg", tmp_path / "merged", "mg", "hf", lora_load=str(tmp_path / "lora"))
    run(tmp_path / "lora", tmp_path / "adapter", "mg", "hf", save_lora_to_hf=True)
    cfg = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert cfg["r"] == R and cfg["lora_alpha"] == ALPHA and cfg["use_rslora"] is False
    assert sorted(cfg["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir), str(tmp_path / "adapter"))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    base = AutoModelForCausalLM.from_pretrained(hf_dir)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got, before = peft_model(ids).logits, merged(ids).logits, base(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (want - before).abs().mean() > 100 * (want - got).abs().mean(), "the adapter changed too little to test"


def test_export_import_round_trip_gives_the_same_megatron_lora(tmp_path):
    hf_dir, hf, arch, adapter = setup_lora(tmp_path, "qwen3")
    run(tmp_path / "lora", tmp_path / "adapter", "mg", "hf", save_lora_to_hf=True)
    run(tmp_path / "adapter", tmp_path / "back", "hf", "mg", target_tp=2, target_pp=2, num_layer_list=[1, 3],
        hf_cfg_dir=hf_dir)
    for stage in range(2):
        for rank in range(2):
            want = megatron_shard(str(tmp_path / "lora"), rank, stage, 2)["model"]
            assert_tensors_close(megatron_shard(str(tmp_path / "back"), rank, stage, 2)["model"], want, exact=True)
    meta = json.load(open(tmp_path / "back" / "mindspeed_lora.json"))
    assert meta["lora"] == {"r": R, "alpha": ALPHA, "dropout": 0.0, "use_rslora": False,
                            "target_modules": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]}
    assert os.path.isfile(tmp_path / "back" / "hf_config" / "config.json")
    # into another layout: the contract's TP=4 shards
    run(tmp_path / "adapter", tmp_path / "tp4", "hf", "mg", target_tp=4, hf_cfg_dir=hf_dir)
    expected = contract_shards(adapter, arch, 4, [arch.num_layers])
    for (rank, stage), want in expected.items():
        assert_tensors_close(megatron_shard(str(tmp_path / "tp4"), rank, stage, 1)["model"], want, exact=True)


def test_lora_checkpoint_reshards_mg_to_mg(tmp_path):
    hf_dir, hf, arch, adapter = setup_lora(tmp_path, "llama3")
    run(tmp_path / "lora", tmp_path / "tp1", "mg", "mg")
    want = contract_shards(adapter, arch, 1, [arch.num_layers])[(0, 0)]
    shard = megatron_shard(str(tmp_path / "tp1"), 0, 0, 1)
    assert_tensors_close(shard["model"], want, exact=True)
    assert shard["iteration"] == 7  # a training checkpoint keeps its iteration
    assert json.load(open(tmp_path / "tp1" / "mindspeed_lora.json"))["lora"]["r"] == R


def test_checkpoint_holding_base_and_adapter_merges_itself(tmp_path):
    """MindSpeed-LLM without --lora-ckpt-filter saves base (as ``.base_layer.``) and adapter in one checkpoint."""
    hf_dir, hf, arch, adapter = setup_lora(tmp_path, "qwen3", base_layout=(2, 2, [1, 3]))
    both = tmp_path / "both"
    lora = tmp_path / "lora"
    for stage in range(2):
        for rank in range(2):
            base = megatron_shard(str(tmp_path / "mg"), rank, stage, 2)
            adapted = {k.rsplit(".", 3)[0] for k in megatron_shard(str(lora), rank, stage, 2)["model"]}
            sd = {(k.replace(".weight", ".base_layer.weight") if k.rsplit(".", 1)[0] in adapted else k): v
                  for k, v in base["model"].items()}
            sd.update(megatron_shard(str(lora), rank, stage, 2)["model"])
            d = both / "iter_0000007" / f"mp_rank_{rank:02d}_{stage:03d}"
            os.makedirs(d)
            torch.save({"model": sd, "iteration": 7}, d / "model_optim_rng.pt")
    (both / "latest_checkpointed_iteration.txt").write_text("7")
    (both / "mindspeed_lora.json").write_text((lora / "mindspeed_lora.json").read_text())
    assert any(".base_layer." in k for k in megatron_shard(str(both), 0, 0, 2)["model"])
    run(both, tmp_path / "merged", "mg", "hf", hf_cfg_dir=hf_dir)
    assert_tensors_close(hf_tensors(str(tmp_path / "merged")), merged_oracle(hf, adapter, ALPHA / R))
