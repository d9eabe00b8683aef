"""--profile's StepProfiler: which iterations it covers, and the NPU path against the fake torch_npu."""
import os

import torch

from mindspeed_lora.training.profiling import StepProfiler
from tests.fake_torch_npu import fake_torch_npu


def _run(prof: StepProfiler, iterations: int, seen: list):
    for it in range(1, iterations + 1):
        prof.begin(it)
        seen.append((it, prof._prof is not None))
        torch.ones(4).sum()
        prof.end(it)
    prof.finish()


def test_npu_profile_uses_torch_npu_profiler_and_covers_the_asked_iterations(tmp_path):
    with fake_torch_npu():
        synced = []
        prof = StepProfiler(3, 5, [0], str(tmp_path), rank=0, device_type="npu",
                            synchronize=lambda: synced.append(True))
        seen = []
        _run(prof, 6, seen)
    assert [it for it, on in seen if on] == [3, 4]
    assert synced == [True]
    assert prof.written == [str(tmp_path)]
    with open(os.path.join(tmp_path, "fake_ascend_pt", "activities.txt")) as f:
        assert f.read() == "CPU,NPU"


def test_rank_not_listed_profiles_nothing_and_a_run_ending_inside_the_range_still_writes(tmp_path):
    idle = StepProfiler(1, 3, [1], str(tmp_path / "a"), rank=0, device_type="cpu", synchronize=lambda: None)
    seen = []
    _run(idle, 4, seen)
    assert not any(on for _, on in seen) and idle.written == [] and not os.path.exists(tmp_path / "a")

    short = StepProfiler(2, 10, [0], str(tmp_path / "b"), rank=0, device_type="cpu", synchronize=lambda: None)
    seen = []
    _run(short, 3, seen)  # the run stops at iteration 3, before --profile-step-end
    assert [it for it, on in seen if on] == [2, 3]
    assert sorted(os.listdir(tmp_path / "b")) == ["ops_rank0.txt", "trace_rank0.json"]
