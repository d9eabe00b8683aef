"""Qwen2 / Qwen2.5: bias on q, k, v; embeddings tied to the output layer when the config says so."""
from mindspeed_lora.models.family import ModelFamily, register_family

QWEN2 = register_family(
    ModelFamily(
        name="qwen2",
        hf_model_types=("qwen2",),
        qk_layernorm=False,
        qkv_bias=True,
        hf_architecture="Qwen2ForCausalLM",
    )
)
