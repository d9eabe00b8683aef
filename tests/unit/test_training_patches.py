"""The optimizer patch: megatron's CUDA type-name checks accept cpu/npu tensors, only while megatron runs."""
import torch

from mindspeed_lora.accelerator import Accelerator
from mindspeed_lora.patches import registry
from mindspeed_lora.patches.megatron_fixes import _cuda_type_name, tensors_named_as_cuda


def test_type_names_inside_the_context_only():
    t = torch.zeros(2)
    assert t.type() == "torch.FloatTensor"
    with tensors_named_as_cuda():
        assert t.type() == "torch.cuda.FloatTensor"
        assert t.bfloat16().type() == "torch.cuda.BFloat16Tensor"
        assert t.type(torch.float64).dtype == torch.float64  # conversions are untouched
    assert t.type() == "torch.FloatTensor"
    assert _cuda_type_name("torch.npu.HalfTensor") == "torch.cuda.HalfTensor"


def test_registered_for_cpu_and_npu_not_cuda():
    names = lambda acc: {p.name for p in registry.patches_for(Accelerator(acc))}  # noqa: E731
    assert "optimizer-param-type-names" in names("cpu") and "optimizer-param-type-names" in names("npu")
    assert "optimizer-param-type-names" not in names("cuda")

