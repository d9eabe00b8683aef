"""The patch layer: every change to megatron-core's behaviour, applied only by ``apply_patches()``."""
from mindspeed_lora.patches.registry import (
    PATCHES,
    Patch,
    PatchTargetMissing,
    applied_patches,
    apply_patches,
    describe,
    patches_for,
    remove_patches,
)

__all__ = [
    "PATCHES",
    "Patch",
    "PatchTargetMissing",
    "applied_patches",
    "apply_patches",
    "describe",
    "patches_for",
    "remove_patches",
]
