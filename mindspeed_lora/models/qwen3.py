"""Qwen3 dense models: RMSNorm on q and k per head (qk-norm), GQA, no biases."""
from mindspeed_lora.models.family import ModelFamily, register_family

QWEN3 = register_family(
    ModelFamily(
        name="qwen3",
        hf_model_types=("qwen3",),
        qk_layernorm=True,
        qkv_bias=False,
        hf_architecture="Qwen3ForCausalLM",
    )
)
