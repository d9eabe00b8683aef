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
