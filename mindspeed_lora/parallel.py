"""Process-group setup shared by every script: torch.distributed + megatron's model-parallel state + RNG."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch

from mindspeed_lora.accelerator import get_accelerator
from mindspeed_lora.errors import UserError
from mindspeed_lora.patches import apply_patches


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize(tp: int = 1, pp: int = 1, seed: int = 1234, timeout_minutes: int = 30,
               verbose_patches: bool = False) -> RankInfo:
    """Start torch.distributed (torchrun env, or a single local rank) and megatron's parallel state."""
    from megatron.core import parallel_state, tensor_parallel

    acc = get_accelerator()
    apply_patches(acc, verbose=verbose_patches)
    if not torch.distributed.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        acc.set_device(local_rank)
        timeout = timedelta(minutes=timeout_minutes)
        if "RANK" not in os.environ:
            # A plain `python script.py`: a world of one on a free port. Passed directly, not through
            # os.environ, so that subprocesses started later (torchrun, other scripts) do not inherit it.
            torch.distributed.init_process_group(backend=acc.dist_backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                                 rank=0, world_size=1, timeout=timeout)
        else:
            torch.distributed.init_process_group(backend=acc.dist_backend, timeout=timeout)
    world = torch.distributed.get_world_size()
    if world % (tp * pp):
        raise UserError(
            f"world size {world} is not divisible by tensor-model-parallel-size {tp} "
            f"x pipeline-model-parallel-size {pp}"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    acc.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return rank_info()


def rank_info() -> RankInfo:
    from megatron.core import parallel_state as ps

    return RankInfo(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
    )


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
