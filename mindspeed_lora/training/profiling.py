"""``--profile``: a device profile of training iterations [--profile-step-start, --profile-step-end) on the
ranks in --profile-ranks (Megatron-LM's flags and step convention).

CUDA and CPU use ``torch.profiler``; each profiled rank writes ``trace_rank{R}.json`` (open it in Perfetto or
chrome://tracing) and ``ops_rank{R}.txt``, the operators and kernels sorted by their own device time (CPU time
on the CPU). On Ascend NPUs ``torch_npu.profiler`` writes its own trace directory (for MindStudio Insight or
TensorBoard) under the same path.
"""
from __future__ import annotations

import os

import torch

from mindspeed_lora.accelerator import get_accelerator


class StepProfiler:
    """Call ``begin(iteration)`` before and ``end(iteration)`` after each training iteration (1-based)."""

    def __init__(self, start: int, end: int, ranks: list[int], save_path: str, rank: int,
                 record_shapes: bool = False, with_memory: bool = False, device_type: str | None = None,
                 synchronize=None):
        self.start_step, self.end_step, self.save_path, self.rank = start, end, save_path, rank
        self.device_type = device_type or get_accelerator().device_type
        self._synchronize = synchronize or get_accelerator().synchronize
        self.enabled = rank in ranks
        self.record_shapes, self.with_memory = record_shapes, with_memory
        self._prof = None
        self.written: list[str] = []

    def _make(self):
        device = self.device_type
        if device == "npu":
            import torch_npu

            p = torch_npu.profiler
            return p.profile(activities=[p.ProfilerActivity.CPU, p.ProfilerActivity.NPU],
                             record_shapes=self.record_shapes, profile_memory=self.with_memory,
                             on_trace_ready=p.tensorboard_trace_handler(self.save_path))
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        return torch.profiler.profile(activities=activities, record_shapes=self.record_shapes,
                                      profile_memory=self.with_memory)

    def begin(self, iteration: int) -> None:
        if self.enabled and iteration == self.start_step and self._prof is None:
            os.makedirs(self.save_path, exist_ok=True)
            self._prof = self._make()
            self._prof.start()

    def end(self, iteration: int) -> None:
        """Stops after iteration end - 1 (or at the last iteration, ``final``) and writes the files."""
        if self._prof is None or iteration < self.end_step - 1:
            return
        self.finish()

    def finish(self) -> None:
        if self._prof is None:
            return
        self._synchronize()
        prof, self._prof = self._prof, None
        prof.stop()
        if self.device_type == "npu":  # its on_trace_ready handler has written the directory
            self.written.append(self.save_path)
            return
        trace = os.path.join(self.save_path, f"trace_rank{self.rank}.json")
        prof.export_chrome_trace(trace + ".tmp")
        os.replace(trace + ".tmp", trace)
        sort = "self_device_time_total" if self.device_type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages(group_by_input_shape=self.record_shapes).table(sort_by=sort, row_limit=60)
        ops = os.path.join(self.save_path, f"ops_rank{self.rank}.txt")
        with open(ops + ".tmp", "w") as f:
            f.write(f"iterations {self.start_step}..{self.end_step - 1}, rank {self.rank}, sorted by {sort}\n{table}\n")
        os.replace(ops + ".tmp", ops)
        self.written += [trace, ops]
