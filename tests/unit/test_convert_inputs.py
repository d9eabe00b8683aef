"""convert_ckpt refuses bad input with a message saying what and where, and never leaves a half output."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from mindspeed_lora.arguments import parse_args
from mindspeed_lora.arguments.convert import ConvertConfig, convert_config_from_args
from mindspeed_lora.checkpoint import megatron_io
from mindspeed_lora.checkpoint.convert import convert
from mindspeed_lora.errors import UserError
from tests.convert_fixtures import (
    arch_of,
    contract_shards,
    hf_tensors,
    peft_state,
    random_adapter,
    tiny_hf,
    write_lora_checkpoint,
)


def run(load, save, load_type="hf", save_type="mg", **kw):
    return convert(ConvertConfig(load_model_type=load_type, save_model_type=save_type, load_dir=str(load),
                                 save_dir=str(save), progress=False, **kw))


def refused(match, load, save, *args, **kw):
    with pytest.raises(UserError, match=match) as e:
        run(load, save, *args, **kw)
    assert not os.path.exists(save) or not os.listdir(save), "a refused conversion left output behind"
    assert not [d for d in os.listdir(os.path.dirname(str(save))) if ".tmp-" in d], "staging dir left behind"
    return str(e.value)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf"))
    tiny_hf("qwen3", path)
    return path


@pytest.fixture(scope="module")
def mg_dir(hf_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("mg") / "ckpt"
    run(hf_dir, path, target_tp=2, target_pp=2)
    return path


@pytest.fixture(scope="module")
def lora_dir(hf_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("lora") / "ckpt"
    arch = arch_of(hf_dir)
    adapter = random_adapter(hf_tensors(hf_dir), arch, 4, seed=2)
    write_lora_checkpoint(str(path), contract_shards(adapter, arch, 2, [2, 2]), arch, 2, [2, 2], 4, 8)
    return path


def copy_tree(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_and_truncated_hf_shards(hf_dir, tmp_path):
    sharded = tmp_path / "sharded"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(hf_dir).save_pretrained(sharded, max_shard_size="200KB")
    files = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))
    assert len(files) > 2
    os.remove(sharded / files[1])
    msg = refused("missing", sharded, tmp_path / "out")
    assert files[1] in msg
    truncated = tmp_path / "truncated"
    AutoModelForCausalLM.from_pretrained(hf_dir).save_pretrained(truncated, max_shard_size="200KB")
    path = truncated / files[1]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert files[1] in refused("truncated", truncated, tmp_path / "out")


def test_missing_and_truncated_megatron_shards(mg_dir, tmp_path):
    broken = copy_tree(mg_dir, tmp_path / "broken")
    shard = broken / "iter_0000001" / "mp_rank_01_001" / "model_optim_rng.pt"
    os.remove(shard)
    assert "mp_rank_01_001" in refused("shard missing", broken, tmp_path / "out", "mg", "hf")
    truncated = copy_tree(mg_dir, tmp_path / "truncated")
    shard = truncated / "iter_0000001" / "mp_rank_00_001" / "model_optim_rng.pt"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 3000])
    assert "mp_rank_00_001" in refused("truncated", truncated, tmp_path / "out", "mg", "hf")


def test_truncated_tensor_in_a_readable_megatron_shard(mg_dir, tmp_path):
    """A shard cut inside a tensor but with its zip directory intact (rewritten) is caught by its byte count."""
    broken = copy_tree(mg_dir, tmp_path / "broken")
    path = broken / "iter_0000001" / "mp_rank_00_000" / "model_optim_rng.pt"
    reader = megatron_io.ShardReader(str(path))
    key = reader.keys()[0]
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1)
    with pytest.raises(UserError, match="truncated|cannot load"):
        megatron_io.ShardReader(str(path)).read(key)


@pytest.mark.parametrize("tp,overrides,what", [
    (3, {}, "num_attention_heads=8"),
    (8, {}, "num_query_groups"),
    (4, {"intermediate_size": 66}, "ffn_hidden_size"),
])
def test_tp_that_does_not_divide_the_model(tmp_path, tp, overrides, what):
    hf = tmp_path / "hf"
    tiny_hf("llama3", str(hf), **overrides)
    msg = refused("--target-tensor-parallel-size", hf, tmp_path / "out", target_tp=tp)
    assert what in msg and str(tp) in msg


def test_pp_layouts_that_do_not_fit(hf_dir, tmp_path):
    refused("does not divide num_layers=4", hf_dir, tmp_path / "out", target_pp=3)
    refused("summing to num_layers=4", hf_dir, tmp_path / "out", target_pp=2, num_layer_list=[1, 2])
    refused("one per pipeline stage", hf_dir, tmp_path / "out", target_pp=2, num_layer_list=[1, 1, 2])


def test_lora_checkpoint_must_match_the_flags(mg_dir, lora_dir, tmp_path):
    flags = {"r": 8, "alpha": 8, "target_modules": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]}
    msg = refused("does not match the LoRA flags", mg_dir, tmp_path / "out", "mg", "hf", lora_load=str(lora_dir),
                  lora_flags=flags)
    assert "r 4 vs 8" in msg and str(lora_dir) in msg
    flags = {"r": 4, "alpha": 8, "target_modules": ["linear_qkv"]}
    msg = refused("does not match the LoRA flags", mg_dir, tmp_path / "out", "mg", "hf", lora_load=str(lora_dir),
                  lora_flags=flags)
    assert "target_modules" in msg
    # matching flags are accepted
    run(mg_dir, tmp_path / "ok", "mg", "hf", lora_load=str(lora_dir),
        lora_flags={"r": 4, "alpha": 8, "target_modules": ["all-linear"]})


def test_lora_checkpoint_without_config_is_checked_against_its_tensors(mg_dir, lora_dir, tmp_path):
    bare = copy_tree(lora_dir, tmp_path / "bare")
    meta = json.load(open(bare / "mindspeed_lora.json"))
    meta["lora"] = None
    (bare / "mindspeed_lora.json").write_text(json.dumps(meta))
    refused("trained with", mg_dir, tmp_path / "out", "mg", "hf", lora_load=str(bare))
    msg = refused("has rank 4", mg_dir, tmp_path / "out", "mg", "hf", lora_load=str(bare),
                  lora_flags={"r": 16, "alpha": 32, "target_modules": ["all-linear"]})
    assert "lora_A" in msg
    msg = refused("unexpected tensor", mg_dir, tmp_path / "out", "mg", "hf", lora_load=str(bare),
                  lora_flags={"r": 4, "alpha": 8, "target_modules": ["linear_qkv"]})
    assert "linear_proj.lora_" in msg or "linear_fc" in msg


def test_unknown_model_types(hf_dir, tmp_path):
    args = parse_args("convert_ckpt", ["--load-dir", hf_dir, "--save-dir", str(tmp_path / "o"),
                                       "--model-type-hf", "gpt5"])
    with pytest.raises(UserError, match="unknown model type 'gpt5'"):
        convert_config_from_args(args)
    args = parse_args("convert_ckpt", ["--load-dir", hf_dir, "--save-dir", str(tmp_path / "o"),
                                       "--model-type-hf", "qwen2"])
    refused("describes a qwen3 model", hf_dir, tmp_path / "o", model_type_hf=convert_config_from_args(args)
            .model_type_hf)
    odd = copy_tree(hf_dir, tmp_path / "gemma")
    cfg = json.load(open(odd / "config.json"))
    cfg["model_type"] = "gemma"
    (odd / "config.json").write_text(json.dumps(cfg))
    assert "config.json" in refused("model_type 'gemma' is not supported", odd, tmp_path / "o")


def test_generic_llama2_name_is_accepted(hf_dir, tmp_path):
    """MindSpeed-LLM's scripts pass --model-type-hf llama2 for Qwen2.5 too: config.json decides."""
    args = parse_args("convert_ckpt", ["--use-mcore-models", "--model-type", "GPT", "--load-dir", hf_dir,
                                       "--save-dir", str(tmp_path / "o"), "--model-type-hf", "llama2",
                                       "--load-checkpoint-loosely", "--no-progress",
                                       "--spec", "mindspeed_llm.tasks.models.spec.qwen3_spec", "layer_spec"])
    cfg = convert_config_from_args(args)
    convert(cfg)
    assert json.load(open(tmp_path / "o" / "mindspeed_lora.json"))["arch"]["family"] == "qwen3"


def test_add_qkv_bias_is_checked(hf_dir, tmp_path):
    args = parse_args("convert_ckpt", ["--load-dir", hf_dir, "--save-dir", str(tmp_path / "o"), "--add-qkv-bias",
                                       "--no-progress"])
    with pytest.raises(UserError, match="--add-qkv-bias: .* describes a qwen3 model, which has no q/k/v biases"):
        convert(convert_config_from_args(args))


def test_unmapped_hf_tensor_is_named(hf_dir, tmp_path):
    odd = copy_tree(hf_dir, tmp_path / "odd")
    tensors = load_file(odd / "model.safetensors")
    tensors["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)
    save_file(tensors, odd / "model.safetensors")
    refused("'model.layers.0.mlp.extra_proj.weight' has no place", odd, tmp_path / "o")
    tensors.pop("model.layers.0.mlp.extra_proj.weight")
    tensors.pop("model.layers.1.self_attn.k_norm.weight")
    save_file(tensors, odd / "model.safetensors")
    refused("'model.layers.1.self_attn.k_norm.weight' not found", odd, tmp_path / "o")


def test_existing_save_dir_is_not_overwritten_silently(hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty.*--overwrite-save-dir"):
        run(hf_dir, out)
    assert (out / "keep.txt").read_text() == "mine"
    run(hf_dir, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "mindspeed_lora.json").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    run(hf_dir, empty)
    assert (empty / "latest_checkpointed_iteration.txt").exists()


def test_save_dir_may_not_be_the_load_dir(hf_dir):
    with pytest.raises(UserError, match="is --load-dir"):
        ConvertConfig("hf", "mg", hf_dir, hf_dir + "/", overwrite=True)


def test_output_appears_only_when_complete(hf_dir, tmp_path, monkeypatch):
    """A conversion that dies midway leaves neither the final dir nor a staging dir."""
    calls = []
    real = megatron_io.write_shard_streaming

    def dies_on_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            assert os.path.isdir(os.path.dirname(os.path.dirname(os.path.dirname(a[0]))))
            assert not (tmp_path / "out").exists(), "the final dir exists before the conversion finished"
            raise RuntimeError("disk full")
        return real(*a, **k)

    monkeypatch.setattr(megatron_io, "write_shard_streaming", dies_on_third)
    with pytest.raises(RuntimeError, match="disk full"):
        run(hf_dir, tmp_path / "out", target_tp=2, target_pp=2)
    assert os.listdir(tmp_path) == []


def test_merge_needs_a_base_and_an_adapter(mg_dir, lora_dir, tmp_path):
    refused("LoRA tensors only", lora_dir, tmp_path / "o", "mg", "hf")
    refused("no LoRA tensors", mg_dir, tmp_path / "o", "mg", "hf", save_lora_to_hf=True)
    refused("no LoRA tensors", mg_dir, tmp_path / "o", "mg", "hf", lora_load=str(mg_dir))
    with pytest.raises(UserError, match="--lora-load is read by mg -> hf"):
        ConvertConfig("hf", "mg", str(mg_dir), str(tmp_path / "o"), lora_load=str(lora_dir))
    plain = tmp_path / "plain"
    plain.mkdir()
    refused("no mindspeed_lora.json", plain, tmp_path / "o", "mg", "hf")


@pytest.fixture
def adapter_dir(hf_dir, tmp_path):
    arch = arch_of(hf_dir)
    adapter = random_adapter(hf_tensors(hf_dir), arch, 4, seed=5)
    path = tmp_path / "adapter"
    path.mkdir()
    save_file(peft_state(adapter), path / "adapter_model.safetensors")
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "base_model_name_or_path": hf_dir, "bias": "none",
           "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def _edit(path, tensors=None, **config):
    if tensors is not None:
        save_file(tensors, path / "adapter_model.safetensors")
    cfg = json.load(open(path / "adapter_config.json"))
    cfg.update(config)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def test_peft_adapter_import_accepts_a_fusable_adapter(adapter_dir, tmp_path):
    run(adapter_dir, tmp_path / "ok", target_tp=2)  # base found through base_model_name_or_path
    assert json.load(open(tmp_path / "ok" / "mindspeed_lora.json"))["lora"]["r"] == 4


def test_peft_adapter_whose_qkv_a_differ_is_refused(adapter_dir, tmp_path):
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    name = "base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"
    tensors[name] = tensors[name] + 0.01
    _edit(adapter_dir, tensors)
    msg = refused("must be identical", adapter_dir, tmp_path / "o")
    assert "layers.1.self_attn.k_proj.lora_A" in msg and "q_proj" in msg


def test_peft_adapter_with_partial_fused_targets_is_refused(adapter_dir, tmp_path):
    _edit(adapter_dir, target_modules=["q_proj", "v_proj"])
    assert "k_proj" in refused("adapt all of them or none", adapter_dir, tmp_path / "o")
    _edit(adapter_dir, target_modules=["q_proj", "k_proj", "v_proj", "lm_head"])
    refused("'lm_head' does not map", adapter_dir, tmp_path / "o")
    _edit(adapter_dir, target_modules=["q_proj", "k_proj", "v_proj"])
    refused("'base_model.model.model.layers.0.mlp.down_proj.lora_A.weight' does not map", adapter_dir,
            tmp_path / "o")
    _edit(adapter_dir, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
          use_dora=True)
    refused("use_dora=True cannot convert", adapter_dir, tmp_path / "o")


def test_peft_adapter_rank_must_match(adapter_dir, tmp_path):
    _edit(adapter_dir, r=8)
    refused("has rank 4; adapter_config.json says r=8", adapter_dir, tmp_path / "o")
    _edit(adapter_dir, r=4)
    refused("does not match the LoRA flags: r 4 vs 16", adapter_dir, tmp_path / "o",
            lora_flags={"r": 16, "alpha": 8, "target_modules": ["all-linear"]})
