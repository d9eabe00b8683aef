"""Megatron's planned exits: --exit-signal-handler, --exit-interval, --exit-duration-in-mins.

After each iteration the loop asks ``ExitWatch.reason``; a non-None answer makes it save a checkpoint (with
--save) and return. The answer is collective: each rank's flags (signal received, time up) are MAX-reduced
over all ranks, so every rank stops after the same iteration even when the signal (a scheduler's SIGTERM
before preemption or the end of its time limit) reached only some of them. The signal handler only sets a
flag: the iteration in flight finishes, nothing is interrupted halfway.
"""
from __future__ import annotations

import signal
import threading
import time

import torch
import torch.distributed as dist

from mindspeed_lora.accelerator import get_accelerator


class ExitWatch:
    def __init__(self, signal_name: str | None, interval: int | None, duration_mins: float | None):
        self.signal_name = signal_name
        self.interval = interval
        self.duration_mins = duration_mins
        self.start = time.time()
        self.received = False
        self._restore = None
        if signal_name is not None and threading.current_thread() is threading.main_thread():
            sig = getattr(signal, signal_name)
            self._restore = (sig, signal.signal(sig, self._on_signal))

    def _on_signal(self, signum, frame) -> None:
        self.received = True

    def reason(self, iteration: int) -> str | None:
        """Why every rank should stop after ``iteration``, or None (collective when any exit is set up)."""
        if self.signal_name is None and self.interval is None and self.duration_mins is None:
            return None
        late = self.duration_mins is not None and time.time() - self.start > 60 * self.duration_mins
        flags = torch.tensor([float(self.received), float(late)], device=get_accelerator().device())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0]:
            return f"{self.signal_name} received"
        if flags[1]:
            return f"--exit-duration-in-mins {self.duration_mins:g} reached"
        if self.interval is not None and iteration % self.interval == 0:
            return f"--exit-interval {self.interval}"
        return None

    def close(self) -> None:
        if self._restore is not None:
            signal.signal(*self._restore)
            self._restore = None
