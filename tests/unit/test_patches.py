"""The patch layer: listing, conditions, idempotent apply, restore, and refusal of a missing target."""
import subprocess
import sys

import pytest

from mindspeed_lora.accelerator import Accelerator
from mindspeed_lora.patches import registry
from mindspeed_lora.patches.registry import Patch, PatchTargetMissing


def test_listing_names_each_patch_and_why():
    out = subprocess.run([sys.executable, "-m", "mindspeed_lora.patches"], capture_output=True, text=True,
                         env={"MINDSPEED_LORA_DEVICE": "cpu", "PATH": ""}, check=True).stdout
    assert out.startswith("device: cpu (dist backend gloo)")
    registry._load_builtin()
    assert registry.PATCHES
    for p in registry.PATCHES:
        assert f"[apply] {p.name}" in out
        assert f"why: {p.reason}" in out
        for t in p.targets:
            assert f"target: {t}" in out


def test_on_cuda_only_the_multi_tensor_fallbacks_apply_and_all_on_cpu():
    # this environment has neither Transformer Engine nor apex, so megatron uses its per-tensor loops
    assert [p.name for p in registry.patches_for(Accelerator("cuda"))] == ["multi-tensor-ops-without-syncs"]
    names = {p.name for p in registry.patches_for(Accelerator("cpu"))}
    assert {"torch-cuda-redirect", "rng-tracker-state", "tied-embedding-sync"} <= names


def test_apply_is_idempotent_and_remove_restores():
    import megatron.core.models.common.embeddings.rotary_pos_embedding as rope
    import megatron.core.tensor_parallel.random as rnd
    import torch

    registry.remove_patches()
    original_get = rnd._get_cuda_rng_state
    assert rope.torch is torch
    first = registry.apply_patches(Accelerator("cpu"))
    assert "torch-cuda-redirect" in first
    assert rope.torch is not torch and rope.torch.cuda.current_device() == torch.device("cpu")
    assert rope.torch.zeros(2, device="cuda").device.type == "cpu"
    assert registry.apply_patches(Accelerator("cpu")) == []  # second call applies nothing
    registry.remove_patches()
    assert rope.torch is torch and rnd._get_cuda_rng_state is original_get
    registry.apply_patches(Accelerator("cpu"))


def test_missing_target_is_refused():
    bad = Patch(name="x", targets=("megatron.core.utils:no_such_function",), reason="r",
                condition=lambda a: True, build=lambda a, o: o)
    with pytest.raises(PatchTargetMissing, match="no_such_function"):
        registry._resolve(bad.targets[0])


def test_rng_tracker_forks_the_cpu_generator():
    import torch
    from megatron.core.tensor_parallel import random as rnd

    registry.apply_patches(Accelerator("cpu"))
    tracker = rnd.CudaRNGStatesTracker()
    torch.manual_seed(0)
    tracker.add("a", 123)
    before = torch.get_rng_state()
    with tracker.fork("a"):
        inside = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)  # the default stream is untouched
    torch.manual_seed(123)
    assert torch.equal(inside, torch.rand(3))


def test_foreach_multi_tensor_ops_equal_megatron_loops():
    import torch
    from megatron.core import utils

    from mindspeed_lora.patches.megatron_fixes import foreach_copy_this_to_that, foreach_l2_norm, foreach_scale

    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(*s, generator=g) for s in ((8, 3), (5,), (2, 2, 7), (1,))]
    want = torch.linalg.vector_norm(torch.cat([t.flatten() for t in grads]))
    got, _ = foreach_l2_norm(2048 * 32, None, [grads], False)
    assert got.shape == (1,) and torch.allclose(got[0], want, rtol=1e-6)

    for scale in (0.37, 1.0):
        src = [t.clone() for t in grads]
        dst_ours = [torch.empty_like(t, dtype=torch.bfloat16) for t in grads]
        dst_ref = [torch.empty_like(t, dtype=torch.bfloat16) for t in grads]
        foreach_scale(2048 * 32, None, [src, dst_ours], scale)
        utils.local_multi_tensor_scale(2048 * 32, None, [src, dst_ref], scale)
        assert all(torch.equal(a, b) for a, b in zip(dst_ours, dst_ref))
    inplace_ours, inplace_ref = [t.clone() for t in grads], [t.clone() for t in grads]
    foreach_scale(2048 * 32, None, [inplace_ours, inplace_ours], 0.5)
    utils.local_multi_tensor_scale(2048 * 32, None, [inplace_ref, inplace_ref], 0.5)
    assert all(torch.equal(a, b) for a, b in zip(inplace_ours, inplace_ref))

    dst = [torch.full(t.shape, 7.0, dtype=torch.bfloat16) for t in grads]
    foreach_copy_this_to_that(grads, dst)  # megatron's loop: that_.copy_(this_) per tensor
    assert all(torch.equal(d, t.bfloat16()) for d, t in zip(dst, grads))
