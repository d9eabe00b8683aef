"""Device selection: override by environment, backends, and a clear error for a bad override."""
import pytest
import torch

from mindspeed_lora.accelerator import Accelerator, detect_device_type
from mindspeed_lora.errors import UserError


def test_override_and_backends(monkeypatch):
    for dev, backend in (("cpu", "gloo"), ("cuda", "nccl"), ("npu", "hccl")):
        monkeypatch.setenv("MINDSPEED_LORA_DEVICE", dev)
        assert detect_device_type() == dev
        assert Accelerator(dev).dist_backend == backend


def test_bad_override(monkeypatch):
    monkeypatch.setenv("MINDSPEED_LORA_DEVICE", "tpu")
    with pytest.raises(UserError, match="expected one of"):
        detect_device_type()


def test_auto_detection_without_accelerators(monkeypatch):
    monkeypatch.delenv("MINDSPEED_LORA_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert detect_device_type() == expected


def test_cpu_accelerator_rng_and_memory():
    acc = Accelerator("cpu")
    acc.manual_seed(5)
    state = acc.get_rng_state()
    a = torch.rand(2)
    acc.set_rng_state(state)
    assert torch.equal(a, torch.rand(2))
    assert acc.device() == torch.device("cpu")
    assert set(acc.memory_stats()) == {"allocated", "max_allocated", "reserved"}


class _FakeNpuModule:
    """torch.npu as torch_npu registers it (the calls the accelerator uses), one device."""

    @staticmethod
    def is_available():
        return True

    @staticmethod
    def device_count():
        return 1

    @staticmethod
    def current_device():
        return 0


def test_npu_is_chosen_when_torch_npu_imports_and_has_a_device(monkeypatch):
    import os
    import sys

    monkeypatch.delenv("MINDSPEED_LORA_DEVICE", raising=False)
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(__file__)), "fake_torch_npu"))
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    monkeypatch.setattr(torch, "npu", _FakeNpuModule, raising=False)
    if torch._C._get_privateuse1_backend_name() != "npu":
        torch.utils.rename_privateuse1_backend("npu")  # what importing torch_npu does: "npu" devices exist
    assert detect_device_type() == "npu"
    acc = Accelerator("npu")
    assert acc.dist_backend == "hccl" and acc.module is _FakeNpuModule
    assert acc.device() == torch.device("npu", 0)

    from mindspeed_lora.patches import patches_for
    from mindspeed_lora.patches.device import DeviceRedirectingTorch

    names = {p.name for p in patches_for(acc)}
    assert {"torch-cuda-redirect", "rng-tracker-state"} <= names
    proxy = DeviceRedirectingTorch(acc)
    assert proxy.cuda is _FakeNpuModule  # megatron's torch.cuda.* calls land on torch.npu
    assert proxy._device("cuda") == torch.device("npu", 0)
    assert proxy._device(torch.device("cuda", 3)) == torch.device("npu", 0)
    assert proxy.Tensor is torch.Tensor

    monkeypatch.setattr(_FakeNpuModule, "device_count", staticmethod(lambda: 0))
    assert detect_device_type() == "cpu"  # torch_npu installed but no device present
