"""The registry of every change this project makes to megatron-core's behaviour.

A patch replaces one attribute (``module:attribute``) with a value built for the current accelerator.
Each has a name, a reason and a condition; ``apply_patches`` applies those whose condition holds, once,
after checking that the target exists in the installed megatron-core; ``remove_patches`` restores the
originals. Nothing is patched at import time.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

from mindspeed_lora.accelerator import Accelerator, get_accelerator


class PatchTargetMissing(RuntimeError):
    """A patch target is absent: the installed megatron-core is not the pinned one."""


@dataclass(frozen=True)
class Patch:
    name: str
    targets: tuple[str, ...]
    """``module.path:attribute`` strings; the same replacement is installed at each."""
    reason: str
    condition: Callable[[Accelerator], bool]
    """True where the patch is needed on this accelerator."""
    build: Callable[[Accelerator, object], object]
    """(accelerator, original value) -> replacement."""
    condition_text: str = ""


@dataclass
class _Applied:
    patch: Patch
    originals: dict = field(default_factory=dict)


PATCHES: list[Patch] = []
_APPLIED: dict[str, _Applied] = {}


def register(patch: Patch) -> Patch:
    if any(p.name == patch.name for p in PATCHES):
        raise ValueError(f"patch {patch.name!r} registered twice")
    PATCHES.append(patch)
    return patch


def _resolve(target: str):
    """``pkg.module:name`` or ``pkg.module:Class.name`` -> (owner object, attribute name)."""
    module_name, _, path = target.partition(":")
    try:
        owner = importlib.import_module(module_name)
    except ImportError as e:
        raise PatchTargetMissing(f"{target}: module not importable ({e})") from e
    *parents, attr = path.split(".")
    for name in parents + [attr]:
        if not hasattr(owner, name):
            raise PatchTargetMissing(f"{target}: attribute {name!r} missing; is megatron-core 0.16.1 installed?")
        if name != attr:
            owner = getattr(owner, name)
    return owner, attr


def patches_for(accelerator: Accelerator | None = None) -> list[Patch]:
    accelerator = accelerator or get_accelerator()
    _load_builtin()
    return [p for p in PATCHES if p.condition(accelerator)]


def apply_patches(accelerator: Accelerator | None = None, verbose: bool = False) -> list[str]:
    """Apply every patch needed on this accelerator; idempotent. Returns the names applied by this call."""
    accelerator = accelerator or get_accelerator()
    done = []
    for patch in patches_for(accelerator):
        if patch.name in _APPLIED:
            continue
        applied = _Applied(patch)
        for target in patch.targets:
            module, attr = _resolve(target)
            original = getattr(module, attr)
            applied.originals[target] = original
            setattr(module, attr, patch.build(accelerator, original))
        _APPLIED[patch.name] = applied
        done.append(patch.name)
    if verbose and done:
        print(f"[mindspeed_lora] device {accelerator.device_type}: applied patches {', '.join(done)}", flush=True)
    return done


def remove_patches() -> None:
    """Restore every original (for tests)."""
    for name in list(_APPLIED)[::-1]:
        for target, original in _APPLIED[name].originals.items():
            module, attr = _resolve(target)
            setattr(module, attr, original)
        del _APPLIED[name]


def applied_patches() -> list[str]:
    return list(_APPLIED)


def _load_builtin() -> None:
    # The patch definitions register themselves on import; importing them patches nothing.
    importlib.import_module("mindspeed_lora.patches.device")
    importlib.import_module("mindspeed_lora.patches.megatron_fixes")


def describe(accelerator: Accelerator | None = None) -> str:
    accelerator = accelerator or get_accelerator()
    _load_builtin()
    lines = [f"device: {accelerator.device_type} (dist backend {accelerator.dist_backend})", ""]
    for p in PATCHES:
        on = p.condition(accelerator)
        lines.append(f"[{'apply' if on else 'skip '}] {p.name}  (when: {p.condition_text})")
        lines.append(f"    why: {p.reason}")
        for t in p.targets:
            lines.append(f"    target: {t}")
    return "\n".join(lines)
