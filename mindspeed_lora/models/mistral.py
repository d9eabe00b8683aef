"""Mistral (7B v0.1-v0.3, Nemo, Small): Llama's tensors and rope, an explicit head_dim where the config gives
one. Sliding-window attention is not implemented: a config with a window is refused for longer sequences
(``ModelArch.check_context``); up to the window, attention is the same."""
from mindspeed_lora.models.family import ModelFamily, register_family

MISTRAL = register_family(
    ModelFamily(
        name="mistral",
        hf_model_types=("mistral",),
        qk_layernorm=False,
        qkv_bias=False,
        hf_architecture="MistralForCausalLM",
    )
)
