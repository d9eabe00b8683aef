"""HF config -> ModelArch: every family, rope scaling against HF's own implementation, TP validation."""
import pytest
import torch

from mindspeed_lora import tiny
from mindspeed_lora.errors import UserError
from mindspeed_lora.models.arch import ModelArch


@pytest.mark.parametrize("family", ["qwen3", "llama3", "qwen2", "mistral"])
def test_from_hf_config_round_trips_through_dict(family):
    cfg = tiny.tiny_hf_config(family).to_dict()
    arch = ModelArch.from_hf_config(cfg)
    assert arch.family == family
    assert (arch.num_layers, arch.hidden_size, arch.num_query_groups) == (2, 64, 2)
    assert arch.qk_layernorm == (family == "qwen3")
    assert arch.qkv_bias == (family == "qwen2")
    assert arch.tie_word_embeddings == (family == "qwen2")
    assert ModelArch.from_dict(arch.to_dict()) == arch
    assert arch.sliding_window is None


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


@pytest.mark.parametrize("yarn", [
    {"factor": 4.0, "original_max_position_embeddings": 16},
    {"factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 16, "beta_slow": 2, "truncate": False},
    {"factor": 4.0, "original_max_position_embeddings": 16, "attention_factor": 1.3},
    {"factor": 40.0, "original_max_position_embeddings": 16, "mscale": 1.0, "mscale_all_dim": 0.7},
])
def test_yarn_frequencies_and_attention_factor_match_hf(yarn):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = tiny.tiny_hf_config("qwen3", rope_scaling={"rope_type": "yarn", **yarn}, max_position_embeddings=64)
    hf_inv, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    arch = ModelArch.from_hf_config(cfg.to_dict())
    assert arch.rope_kind == "yarn"
    assert torch.allclose(arch.rope_inv_freq(), hf_inv.float(), rtol=1e-6, atol=0)
    assert arch.rope_attention_factor() == pytest.approx(hf_factor, rel=1e-12)
    assert hf_factor != 1.0


def test_yarn_attention_factor_reaches_megatron_exactly():
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        _yarn_get_concentration_factor_from_config,
    )

    from mindspeed_lora.models.builder import set_rope_attention_factor

    class Config:
        pass
    for factor in (1.3, 1.1386294361119891, 0.9):
        config = Config()
        set_rope_attention_factor(config, factor)
        assert _yarn_get_concentration_factor_from_config(config) == pytest.approx(factor, rel=1e-12)
    untouched = Config()
    set_rope_attention_factor(untouched, 1.0)
    assert not hasattr(untouched, "yarn_rotary_scaling_factor")


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


def test_sliding_window_is_read_from_each_config_style_and_longer_contexts_are_refused():
    def window(family, **kw):
        return ModelArch.from_hf_config(tiny.tiny_hf_config(family, **kw).to_dict()).sliding_window

    assert window("mistral", sliding_window=16) == 16  # Mistral 7B v0.1: every layer
    assert window("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1) == 16
    assert window("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=2) is None  # no layer
    assert window("qwen3", use_sliding_window=False, sliding_window=16) is None
    # a config written before transformers listed layer_types
    old = {**tiny.tiny_hf_config("qwen2").to_dict(), "use_sliding_window": True, "sliding_window": 16,
           "max_window_layers": 0}
    del old["layer_types"]
    assert ModelArch.from_hf_config(old).sliding_window == 16
    arch = ModelArch.from_hf_config(tiny.tiny_hf_config("mistral", sliding_window=16).to_dict())
    arch.check_context(16, "--seq-length")
    with pytest.raises(UserError, match="--seq-length 17: this mistral model's layers attend to a sliding window "
                                        "of 16 tokens, which is not implemented here"):
        arch.check_context(17, "--seq-length")
    # a checkpoint's metadata from before the field reads as no window
    legacy = arch.to_dict()
    del legacy["sliding_window"]
    assert ModelArch.from_dict(legacy).sliding_window is None
