"""HF config -> ModelArch: every family, rope scaling against HF's own implementation, TP validation."""
import pytest
import torch

from mindspeed_lora import tiny
from mindspeed_lora.errors import UserError
from mindspeed_lora.models.arch import ModelArch


@pytest.mark.parametrize("family", ["qwen3", "llama3", "qwen2"])
def test_from_hf_config_round_trips_through_dict(family):
    cfg = tiny.tiny_hf_config(family).to_dict()
    arch = ModelArch.from_hf_config(cfg)
    assert arch.family == family
    assert (arch.num_layers, arch.hidden_size, arch.num_query_groups) == (2, 64, 2)
    assert arch.qk_layernorm == (family == "qwen3")
    assert arch.qkv_bias == (family == "qwen2")
    assert arch.tie_word_embeddings == (family == "qwen2")
    assert ModelArch.from_dict(arch.to_dict()) == arch


@pytest.mark.parametrize("family", ["qwen3", "llama3"])
def test_rope_inv_freq_matches_hf(family):
    from transformers import AutoModelForCausalLM

    cfg = tiny.tiny_hf_config(family)
    model = AutoModelForCausalLM.from_config(cfg)
    hf_inv = model.model.rotary_emb.inv_freq
    ours = ModelArch.from_hf_config(cfg.to_dict()).rope_inv_freq()
    assert torch.allclose(ours, hf_inv.float(), rtol=1e-6, atol=0)
    if family == "llama3":  # scaling really changed something
        d = ModelArch.from_hf_config(cfg.to_dict()).kv_channels
        plain = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, d, 2).float() / d))
        assert not torch.allclose(ours, plain)


def test_unknown_model_type_and_missing_keys():
    with pytest.raises(UserError, match="model_type 'gpt2' is not supported"):
        ModelArch.from_hf_config({"model_type": "gpt2"})
    cfg = tiny.tiny_hf_config("qwen3").to_dict()
    del cfg["hidden_size"]
    with pytest.raises(UserError, match="missing key 'hidden_size'"):
        ModelArch.from_hf_config(cfg, "x/config.json")


def test_tp_must_divide_heads_groups_ffn_vocab():
    arch = ModelArch.from_hf_config(tiny.tiny_hf_config("qwen3").to_dict())
    arch.check_tensor_parallel(2)
    with pytest.raises(UserError, match="does not divide num_attention_heads=4"):
        arch.check_tensor_parallel(8)
    with pytest.raises(UserError, match="num_query_groups"):
        arch.check_tensor_parallel(4)
