"""Training checkpoints: save (atomically) and resume exactly.

Layout (``checkpoint/megatron_io.py``)::

    save/latest_checkpointed_iteration.txt, save/mindspeed_lora.json, save/hf_config/
    save/iter_0000010/mp_rank_TT[_PPP]/model_optim_rng.pt   written by data-parallel rank 0 of (TT, PPP)
    save/iter_0000010/mp_rank_TT[_PPP]/distrib_optim.pt     --use-distributed-optimizer: every DP rank's
                                                           optimizer shard, gathered (megatron's dp-zero form)

``model_optim_rng.pt`` holds ``model`` (all weights; adapter keys only in a LoRA run), ``iteration``,
``checkpoint_version``, ``args`` (plain dict), ``training`` (consumed samples: the data position),
``optimizer`` and ``opt_param_scheduler`` (unless --no-save-optim) and ``rng_state`` (one entry per
data-parallel rank, unless --no-save-rng). Everything is tensors, numbers, strings, lists and dicts, so
``torch.load(weights_only=True)`` reads it.

Every rank writes into ``iter_XXXXXXX.tmp-<token>``; after a barrier, global rank 0 renames it into place
and only then updates latest_checkpointed_iteration.txt.
"""
from __future__ import annotations

import os
import random
import shutil
import time
import uuid

import numpy as np
import torch
import torch.distributed as dist

from mindspeed_lora.accelerator import get_accelerator
from mindspeed_lora.checkpoint import megatron_io
from mindspeed_lora.checkpoint.hf_writer import HF_SIDE_FILES
from mindspeed_lora.errors import UserError

DISTRIB_OPTIM = "distrib_optim.pt"
_HF_FILES = ("config.json", *HF_SIDE_FILES)  # the same files the converter keeps beside its shards


# ---------------------------------------------------------------------------------------------- RNG

def rng_state() -> dict:
    """Every generator a training step draws from, as plain data."""
    from megatron.core import tensor_parallel

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "accelerator": get_accelerator().get_rng_state(),
        "tracker": dict(tensor_parallel.get_cuda_rng_tracker().get_states()),
    }


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    get_accelerator().set_rng_state(state["accelerator"])
    tensor_parallel.get_cuda_rng_tracker().set_states(dict(state["tracker"]))


# ---------------------------------------------------------------------------------------------- helpers

def _inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _is_distributed(opt) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return isinstance(opt, DistributedOptimizer)


def _token() -> str:
    """One staging token for all ranks (rank 0's, broadcast)."""
    obj = [uuid.uuid4().hex[:12] if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(obj, src=0)
    return obj[0]


def copy_hf_files(src_dir: str, save_dir: str) -> None:
    """Keep the HF config and tokenizer beside the checkpoint (later steps read them from there)."""
    dst = os.path.join(save_dir, megatron_io.HF_CONFIG_DIR)
    if os.path.isdir(dst):
        return
    nested = os.path.join(src_dir, megatron_io.HF_CONFIG_DIR)
    src = nested if os.path.isdir(nested) else src_dir
    files = [f for f in _HF_FILES if os.path.isfile(os.path.join(src, f))]
    if not files:
        return
    tmp = f"{dst}.tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    for f in files:
        shutil.copy2(os.path.join(src, f), os.path.join(tmp, f))
    os.replace(tmp, dst)


# ---------------------------------------------------------------------------------------------- save

def save_checkpoint(save_dir: str, iteration: int, *, model_state: dict, optimizer, scheduler, rank,
                    consumed_train_samples: int, args: dict, metadata: dict, save_optim: bool, save_rng: bool,
                    hf_source: str | None = None) -> str:
    """Write iteration ``iteration``; collective over all ranks. Returns the published directory."""
    from megatron.core import parallel_state as ps

    t0 = time.time()
    token = _token()
    staged = megatron_io.staging_dir(save_dir, iteration, token)
    shard = megatron_io.shard_path(staged, rank.tp_rank, rank.pp_rank, rank.pp_size)
    dp_group = ps.get_data_parallel_group()
    rngs = None
    if save_rng:
        rngs = [None] * rank.dp_size
        dist.all_gather_object(rngs, rng_state(), group=dp_group)
    state = {
        "model": {k: v.detach().cpu().clone() for k, v in model_state.items()},
        "iteration": iteration,
        "checkpoint_version": megatron_io.CHECKPOINT_VERSION,
        "args": args,
        "training": {"consumed_train_samples": consumed_train_samples},
    }
    distributed_states = []
    if save_optim:
        inner = _inner_optimizers(optimizer)
        state["optimizer"] = [opt.state_dict() for opt in inner]
        state["opt_param_scheduler"] = scheduler.state_dict()
        # dp-zero gather is collective over the data-parallel group
        distributed_states = [opt.get_parameter_state_dp_zero() if _is_distributed(opt) else None for opt in inner]
    if rngs is not None:
        state["rng_state"] = rngs
    if rank.dp_rank == 0:
        megatron_io.atomic_torch_save(state, shard)
        if any(s is not None for s in distributed_states):
            megatron_io.atomic_torch_save(distributed_states, os.path.join(os.path.dirname(shard), DISTRIB_OPTIM))
    dist.barrier()
    final = os.path.join(save_dir, megatron_io.iteration_dir_name(iteration))
    if dist.get_rank() == 0:
        final = megatron_io.publish_iteration(save_dir, iteration, token)
        megatron_io.write_metadata(save_dir, metadata)
        if hf_source:
            copy_hf_files(hf_source, save_dir)
        print(f"saved checkpoint at iteration {iteration} to {final} ({time.time() - t0:.2f} s)", flush=True)
    dist.barrier()
    return final


# ---------------------------------------------------------------------------------------------- load

def read_training_state(load_dir: str, rank, iteration: int | None = None) -> tuple[str, dict | None]:
    """(this rank's shard path of ``iteration``, else of the latest; its full dict) when a training run wrote it,
    else (path, None).

    The weights are loaded separately (streamed by ``checkpoint.loading``); this reads the shard's pickle on
    the meta device first, so a converted checkpoint (no ``training`` entry) is never read in full here.
    """
    iter_dir = megatron_io.resolve_iteration_dir(load_dir, iteration)
    path = megatron_io.shard_path(iter_dir, rank.tp_rank, rank.pp_rank, rank.pp_size)
    if not isinstance(megatron_io.ShardReader(path).extra.get("training"), dict):
        return path, None
    return path, megatron_io.load_shard(path)


def _load_distributed_param_state(opt, state: dict | None) -> None:
    """megatron's dp-zero scatter of (main param, exp_avg, exp_avg_sq) shards into the optimizer.

    With torch's Adam (no apex / Transformer Engine) each param's optimizer state also holds ``step``, which
    megatron's copy loop expects in the file; the step was already restored from the param groups by
    ``load_state_dict``, so it is set aside during the scatter and put back -- as one tensor per param:
    megatron hands every param the same step tensor, and Adam's in-place ``step += 1`` would then advance
    it once per param per iteration, skewing the bias correction. fp32 main params are views of the model
    params: the copies run without autograd.
    """
    states = opt.optimizer.state
    steps = {p: st.pop("step") for p, st in states.items() if "step" in st}
    try:
        with torch.no_grad():
            opt.load_parameter_state_from_dp_zero(state)
    finally:
        for p, step in steps.items():
            states[p]["step"] = step.clone()


def restore_training_state(path: str, state: dict, *, optimizer, scheduler, rank, load_optim: bool,
                           load_rng: bool) -> tuple[int, int]:
    """Optimizer, scheduler and RNG from a training checkpoint; returns (iteration, consumed samples)."""
    if load_optim:
        if "optimizer" not in state:
            raise UserError(f"{path}: saved without optimizer state (--no-save-optim); resume with "
                            "--no-load-optim, or start fresh with --finetune")
        inner = _inner_optimizers(optimizer)
        saved = state["optimizer"]
        if len(saved) != len(inner):
            raise UserError(f"{path}: holds {len(saved)} optimizer states, this run has {len(inner)}")
        distributed = any(_is_distributed(o) for o in inner)
        dist_file = os.path.join(os.path.dirname(path), DISTRIB_OPTIM)
        if distributed != os.path.isfile(dist_file):
            raise UserError(f"{path}: saved {'with' if os.path.isfile(dist_file) else 'without'} "
                            "--use-distributed-optimizer; resume with the same setting")
        dist_states = None
        if distributed and rank.dp_rank == 0:
            dist_states = megatron_io.load_shard(dist_file)
        for i, (opt, sd) in enumerate(zip(inner, saved)):
            opt.load_state_dict(sd)
            if _is_distributed(opt):
                _load_distributed_param_state(opt, dist_states[i] if dist_states is not None else None)
        scheduler.load_state_dict(state["opt_param_scheduler"])
    if load_rng:
        if "rng_state" not in state:
            raise UserError(f"{path}: saved without RNG state (--no-save-rng); resume with --no-load-rng")
        rngs = state["rng_state"]
        if len(rngs) != rank.dp_size:
            raise UserError(f"{path}: RNG states of {len(rngs)} data-parallel ranks, this run has "
                            f"{rank.dp_size}; resume with --no-load-rng")
        set_rng_state(rngs[rank.dp_rank])
    return int(state["iteration"]), int(state["training"]["consumed_train_samples"])
