"""mindspeed_lora: LoRA and full-parameter post-training of LLMs on megatron-core (Ascend NPU, GPU, CPU)."""
from setuptools import find_packages, setup

setup(
    name="mindspeed_lora",
    version="0.1.0",
    description="LoRA / full post-training of LLMs on megatron-core for Ascend NPU, NVIDIA GPU and CPU",
    packages=find_packages(include=["mindspeed_lora", "mindspeed_lora.*"]),
    python_requires=">=3.11",
    # torch is a floor only: an installed torch (CPU, CUDA or the one torch_npu needs) is never upgraded.
    install_requires=[
        "torch>=2.6",
        "megatron-core==0.16.1",
        "transformers>=4.51",
        "peft>=0.15",
        "safetensors>=0.4",
        "tokenizers>=0.21",
        "pyarrow>=14",
        "numpy>=1.26",
        "tqdm>=4.66",
        "tensorboard>=2.15",
        "matplotlib>=3.8",
    ],
    extras_require={
        "npu": ["torch-npu"],
        "test": ["pytest>=8", "ruff>=0.6", "datasets>=2.19"],
    },
    include_package_data=True,
)
