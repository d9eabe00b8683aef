"""The device this process runs on: npu, cuda or cpu, and everything that differs between them.

Selection: ``MINDSPEED_LORA_DEVICE`` (npu|cuda|cpu) when set, else npu when ``torch_npu`` imports and a
device is present, else cuda when available, else cpu. The rest of the package asks this module, never
``torch.cuda`` directly, so one code path serves all three.
"""
from __future__ import annotations

import functools
import importlib
import os
import sys
from dataclasses import dataclass

import torch

from mindspeed_lora.errors import UserError

ENV_VAR = "MINDSPEED_LORA_DEVICE"
DIST_BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}


@functools.lru_cache(maxsize=16)
def _torch_npu_importable(search_path: tuple[str, ...]) -> bool:
    # A failed import is not remembered by Python: each attempt searches sys.path again (~30 us), and the
    # ops ask for the device on every call. Remembered per sys.path, so a path added later is still seen.
    try:
        importlib.import_module("torch_npu")
    except ImportError:
        return False
    return True


def _npu_present() -> bool:
    if "torch_npu" not in sys.modules and not _torch_npu_importable(tuple(sys.path)):
        return False
    npu = getattr(torch, "npu", None)
    return bool(npu is not None and npu.is_available() and npu.device_count() > 0)


def detect_device_type() -> str:
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced:
        if forced not in DIST_BACKENDS:
            raise UserError(f"{ENV_VAR}={forced!r}: expected one of {sorted(DIST_BACKENDS)}")
        return forced
    if _npu_present():
        return "npu"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


class _CpuDeviceModule:
    """The subset of the ``torch.cuda`` API that megatron-core calls, answered for the CPU.

    Streams and events are no-ops (CPU work is synchronous); RNG calls act on the CPU generator, which
    plays the role of the device generator; memory calls report zero.
    """

    class Stream:
        def __init__(self, *args, **kwargs):
            pass

        def wait_stream(self, other):
            pass

        def synchronize(self):
            pass

        def wait_event(self, event):
            pass

        def record_event(self, event=None):
            return event or _CpuDeviceModule.Event()

    class Event:
        def __init__(self, *args, **kwargs):
            pass

        def record(self, stream=None):
            pass

        def wait(self, stream=None):
            pass

        def synchronize(self):
            pass

        def query(self):
            return True

        def elapsed_time(self, other):
            return 0.0

    class nvtx:  # noqa: N801 - mirrors torch.cuda.nvtx
        @staticmethod
        def range_push(msg):
            pass

        @staticmethod
        def range_pop():
            pass

    OutOfMemoryError = torch.OutOfMemoryError
    FloatTensor = torch.FloatTensor
    HalfTensor = torch.HalfTensor
    BFloat16Tensor = torch.BFloat16Tensor

    _stream = Stream()

    @staticmethod
    def is_available():
        return False

    @staticmethod
    def device_count():
        return 1

    @staticmethod
    def current_device():
        return torch.device("cpu")

    @staticmethod
    def set_device(device):
        pass

    @classmethod
    def current_stream(cls, device=None):
        return cls._stream

    @classmethod
    def default_stream(cls, device=None):
        return cls._stream

    @staticmethod
    def stream(stream):
        import contextlib

        return contextlib.nullcontext()

    @staticmethod
    def synchronize(device=None):
        pass

    @staticmethod
    def empty_cache():
        pass

    @staticmethod
    def get_rng_state(device=None):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state, device=None):
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed):
        torch.manual_seed(seed)

    @staticmethod
    def manual_seed_all(seed):
        torch.manual_seed(seed)

    @staticmethod
    def memory_allocated(device=None):
        return 0

    @staticmethod
    def max_memory_allocated(device=None):
        return 0

    @staticmethod
    def memory_reserved(device=None):
        return 0

    @staticmethod
    def reset_peak_memory_stats(device=None):
        pass

    @staticmethod
    def memory_stats(device=None):
        return {}

    class random:  # noqa: N801 - mirrors torch.cuda.random
        @staticmethod
        def get_rng_state(device=None):
            return torch.get_rng_state()


@dataclass(frozen=True)
class Accelerator:
    """One device type and its conventions."""

    device_type: str

    @property
    def dist_backend(self) -> str:
        return DIST_BACKENDS[self.device_type]

    @property
    def module(self):
        """The ``torch.cuda``-like namespace of this device (``torch.npu``, ``torch.cuda`` or a CPU stand-in)."""
        if self.device_type == "cuda":
            return torch.cuda
        if self.device_type == "npu":
            importlib.import_module("torch_npu")
            return torch.npu
        return _CpuDeviceModule

    def set_device(self, local_rank: int) -> None:
        if self.device_type != "cpu":
            self.module.set_device(local_rank)

    def device(self) -> torch.device:
        if self.device_type == "cpu":
            return torch.device("cpu")
        return torch.device(self.device_type, self.module.current_device())

    def synchronize(self) -> None:
        self.module.synchronize()

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        if self.device_type != "cpu":
            self.module.manual_seed(seed)

    def get_rng_state(self) -> torch.Tensor:
        return self.module.get_rng_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        self.module.set_rng_state(state)

    def memory_stats(self) -> dict:
        """Bytes allocated now, peak allocated and reserved; RSS of the process on the CPU."""
        if self.device_type == "cpu":
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            return {"allocated": 0, "max_allocated": peak, "reserved": 0}
        m = self.module
        return {
            "allocated": m.memory_allocated(),
            "max_allocated": m.max_memory_allocated(),
            "reserved": m.memory_reserved(),
        }

    def reset_peak_memory_stats(self) -> None:
        self.module.reset_peak_memory_stats()

    def use_deterministic_algorithms(self) -> dict[str, str]:
        """Bitwise-repeatable runs (--deterministic-mode / MindSpeed-LLM's --npu-deterministic): torch's
        deterministic kernels (a warning, not an error, where an op has none), plus the collective library's
        deterministic reductions on NPU (HCCL_DETERMINISTIC) and cuBLAS's fixed workspace and NCCL's ring
        algorithm on GPU. Call before the process group exists: HCCL and NCCL read these when they start.
        Returns the environment variables it set."""
        env = {"npu": {"HCCL_DETERMINISTIC": "true"},
               "cuda": {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "NCCL_ALGO": "Ring"}}.get(self.device_type, {})
        for key, value in env.items():
            os.environ[key] = value
        torch.use_deterministic_algorithms(True, warn_only=True)
        return env


@functools.lru_cache(maxsize=None)
def _accelerator(device_type: str) -> Accelerator:
    return Accelerator(device_type)


def get_accelerator() -> Accelerator:
    """The accelerator of this process (re-read from the environment each call; cheap)."""
    return _accelerator(detect_device_type())
