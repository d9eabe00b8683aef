"""Llama 3 / 3.1 / 3.2: GQA, no biases, llama3 rope scaling read from the config."""
from mindspeed_lora.models.family import ModelFamily, register_family

LLAMA3 = register_family(
    ModelFamily(
        name="llama3",
        hf_model_types=("llama",),
        qk_layernorm=False,
        qkv_bias=False,
        hf_architecture="LlamaForCausalLM",
    )
)
