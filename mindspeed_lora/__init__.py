"""mindspeed_lora: LoRA and full-parameter post-training of LLMs on megatron-core (NPU, GPU, CPU)."""
__version__ = "0.1.0"
