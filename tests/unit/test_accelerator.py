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


@pytest.mark.parametrize("device, env", [
    ("npu", {"HCCL_DETERMINISTIC": "true"}),
    ("cuda", {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "NCCL_ALGO": "Ring"}),
    ("cpu", {}),
])
def test_deterministic_mode_sets_torch_and_the_collectives(monkeypatch, device, env):
    for key in ("HCCL_DETERMINISTIC", "CUBLAS_WORKSPACE_CONFIG", "NCCL_ALGO"):
        monkeypatch.delenv(key, raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    try:
        assert Accelerator(device).use_deterministic_algorithms() == env
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        import os

        assert {k: os.environ.get(k) for k in env} == env
        assert all(k not in os.environ for k in {"HCCL_DETERMINISTIC", "NCCL_ALGO"} - set(env))
    finally:
        torch.use_deterministic_algorithms(False)


def test_deterministic_flags():
    import shlex

    from mindspeed_lora.arguments import parse_args
    from mindspeed_lora.training.config import training_config_from_args

    base = "--data-path /d --load /m --seq-length 64 --global-batch-size 4 --train-iters 3 --lr 1e-4"
    for flag in ("", "--deterministic-mode", "--npu-deterministic", "--use-deter-comp"):
        cfg = training_config_from_args(parse_args("posttrain_gpt", shlex.split(f"{base} {flag}")))
        assert cfg.deterministic == bool(flag)


def test_cpu_accelerator_rng_and_memory():
    acc = Accelerator("cpu")
    acc.manual_seed(5)
    state = acc.get_rng_state()
    a = torch.rand(2)
    acc.set_rng_state(state)
    assert torch.equal(a, torch.rand(2))
    assert acc.device() == torch.device("cpu")
    assert set(acc.memory_stats()) == {"allocated", "max_allocated", "reserved"}


_NPU_SCRIPT = r"""
import sys
import torch
from tests.fake_torch_npu import fake_torch_npu


class FakeNpu:  # torch.npu as torch_npu registers it: the calls the accelerator makes
    count = 1
    is_available = staticmethod(lambda: True)
    device_count = staticmethod(lambda: FakeNpu.count)
    current_device = staticmethod(lambda: 0)


torch.npu = FakeNpu
torch.utils.rename_privateuse1_backend("npu")  # what importing torch_npu does: "npu" devices exist
from mindspeed_lora.accelerator import Accelerator, detect_device_type
from mindspeed_lora.patches import patches_for
from mindspeed_lora.patches.device import DeviceRedirectingTorch

with fake_torch_npu():
    assert detect_device_type() == "npu"
    acc = Accelerator("npu")
    assert acc.dist_backend == "hccl" and acc.module is FakeNpu
    assert acc.device() == torch.device("npu", 0)
    names = {p.name for p in patches_for(acc)}
    assert {"torch-cuda-redirect", "rng-tracker-state"} <= names, names
    proxy = DeviceRedirectingTorch(acc)
    assert proxy.cuda is FakeNpu  # megatron's torch.cuda.* calls land on torch.npu
    assert proxy._device("cuda") == torch.device("npu", 0)
    assert proxy._device(torch.device("cuda", 3)) == torch.device("npu", 0)
    assert proxy.Tensor is torch.Tensor
    FakeNpu.count = 0
    assert detect_device_type() == "cpu"  # torch_npu installed but no device present
print("npu-ok")
"""


def test_npu_is_chosen_when_torch_npu_imports_and_has_a_device():
    # In a subprocess: naming the PrivateUse1 backend "npu" (as torch_npu does) cannot be undone.
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "MINDSPEED_LORA_DEVICE"}
    env["PYTHONPATH"] = root
    out = subprocess.run([sys.executable, "-c", _NPU_SCRIPT], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "npu-ok" in out.stdout, out.stderr
