"""Which implementation of a fused op runs: the device's kernel, or the plain-torch reference.

Every op has three implementations: ``reference`` (plain torch, the specification, what the CPU runs), ``cuda``
and ``npu``. ``select`` picks the accelerator's one (``mindspeed_lora.accelerator``) unless ``force_impl``
names another. A kernel that cannot run (library missing, tensor on another device) falls back to the
reference with the reason logged once; a *forced* kernel that cannot run is an error, so a test that forces
a kernel never passes on the reference by accident.
"""
from __future__ import annotations

import functools
import importlib
import logging
import weakref
from typing import Callable, Mapping

import torch

from mindspeed_lora.accelerator import get_accelerator

logger = logging.getLogger("mindspeed_lora.ops")

IMPLS = ("reference", "cuda", "npu")

# impl -> (forced: bool, tensors) -> None when the kernel can run, else the reason it cannot
Availability = Callable[[bool, tuple], "str | None"]


class KernelUnavailable(RuntimeError):
    """A kernel named by ``force_impl`` cannot run here."""


_LOGGED: set[tuple[str, str, str]] = set()


def _log_fallback(op: str, impl: str, reason: str) -> None:
    key = (op, impl, reason)
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.warning("%s: %s kernel unavailable (%s); using the torch reference", op, impl, reason)


def device_impl() -> str:
    """The implementation the current accelerator prefers."""
    device_type = get_accelerator().device_type
    return device_type if device_type in ("cuda", "npu") else "reference"


def select(op: str, force_impl: str | None, availability: Mapping[str, Availability], *tensors,
           unsupported: Mapping[str, str | None] | None = None) -> str:
    """Name of the implementation of ``op`` to run on ``tensors``.

    ``unsupported`` maps an implementation to the reason it cannot take this particular call (an argument
    its kernel lacks), or None.
    """
    def reason_for(impl: str, forced: bool) -> str | None:
        check = availability.get(impl)
        if check is None:
            return "no such kernel"
        return check(forced, tensors) or (unsupported or {}).get(impl)

    if force_impl is not None:
        if force_impl not in IMPLS:
            raise ValueError(f"{op}: force_impl={force_impl!r}; expected one of {IMPLS}")
        if force_impl == "reference":
            return "reference"
        reason = reason_for(force_impl, True)
        if reason:
            raise KernelUnavailable(f"{op}: force_impl={force_impl!r} cannot run: {reason}")
        return force_impl
    want = device_impl()
    if want == "reference":
        return want
    reason = reason_for(want, False)
    if reason:
        _log_fallback(op, want, reason)
        return "reference"
    return want


class TensorMemo:
    """Remembers ``compute()`` for the last few key tensors seen, by object identity and in-place version.

    The tensors a model passes to every layer in one step (rotary angles, packed-sequence offsets) are the
    same objects, so derived values (cos/sin tables, host-side lengths) are computed once per step, not per
    layer. Holds weak references to the keys only; keeps ``slots`` entries (least recently used dropped), so
    two models used in turn (e.g. a policy and a reference model, or two variants in a benchmark) do not
    recompute each other's tables, and a value a captured CUDA graph reads is not freed by the other model.
    """

    def __init__(self, slots: int = 4):
        self.slots = slots
        self._entries: list[tuple[tuple, object, object]] = []  # (refs, extra, value), most recent last

    @staticmethod
    def _matches(refs: tuple, tensors: tuple) -> bool:
        return len(refs) == len(tensors) and all(
            r() is t and (t is None or t._version == v) for (r, v), t in zip(refs, tensors))

    def get(self, tensors: tuple, extra, compute: Callable):
        for i, (refs, e, value) in enumerate(self._entries):
            if e == extra and self._matches(refs, tensors):
                self._entries.append(self._entries.pop(i))
                return value
        value = compute()
        refs = tuple((weakref.ref(t), t._version) if t is not None else (_none_ref, 0) for t in tensors)
        live = [entry for entry in self._entries if all(r() is not None or r is _none_ref for r, _ in entry[0])]
        self._entries = (live + [(refs, extra, value)])[-self.slots:]
        return value


def _none_ref():
    return None


def torch_npu_module():
    """``torch_npu``, imported on each use (tests put a fake one on ``sys.path``; never cached here)."""
    return importlib.import_module("torch_npu")


def npu_availability(*op_names: str) -> Availability:
    """Availability of torch_npu ops: importable, each op present, tensors on the NPU unless forced."""

    def check(forced: bool, tensors: tuple) -> str | None:
        try:
            mod = torch_npu_module()
        except ImportError as e:
            return f"torch_npu not importable ({e})"
        missing = [n for n in op_names if not hasattr(mod, n)]
        if missing:
            return f"torch_npu lacks {', '.join(missing)}"
        if not forced:
            off = {t.device.type for t in tensors if isinstance(t, torch.Tensor)} - {"npu"}
            if off:
                return f"tensors on {sorted(off)}"
        return None

    return check


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        importlib.import_module("triton")
    except ImportError as e:
        return f"triton not importable ({e})"
    return None


def cuda_availability(needs_triton: bool = False) -> Availability:
    """Availability of a CUDA kernel: every tensor on a CUDA device (forced or not), Triton if needed."""

    def check(forced: bool, tensors: tuple) -> str | None:
        off = {t.device.type for t in tensors if isinstance(t, torch.Tensor)} - {"cuda"}
        if off:
            return f"tensors on {sorted(off)}"
        if needs_triton:
            return _triton_import_error()
        return None

    return check
