"""Model families (Qwen3, Llama 3, Qwen2): HF config -> TransformerConfig, layer spec, weight-name tables."""
from mindspeed_lora.models.arch import ModelArch
from mindspeed_lora.models.family import FAMILIES, ModelFamily, WeightRule, family_for_hf_config, get_family

__all__ = ["FAMILIES", "ModelArch", "ModelFamily", "WeightRule", "family_for_hf_config", "get_family"]
