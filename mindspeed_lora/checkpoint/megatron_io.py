"""Megatron checkpoint layout (as MindSpeed-LLM writes it), read and written safely.

    save_dir/
      latest_checkpointed_iteration.txt        the iteration, e.g. "1" after conversion
      mindspeed_lora.json                      architecture (ModelArch), parallel layout, LoRA config: plain JSON
      hf_config/                               the HF config.json and tokenizer files, for later steps
      iter_0000001/
        mp_rank_TT/model_optim_rng.pt          PP == 1
        mp_rank_TT_PPP/model_optim_rng.pt      PP > 1

``model_optim_rng.pt`` is a dict: ``model`` (state dict), ``iteration``, ``checkpoint_version`` 3.0 and
``args`` -- args as a plain dict, so every file loads with ``torch.load(weights_only=True)``.

Atomicity: an iteration is written into ``iter_XXXXXXX.tmp-<token>``, renamed to ``iter_XXXXXXX`` when
complete, and only then does ``latest_checkpointed_iteration.txt`` (itself replaced atomically) point at it.
"""
from __future__ import annotations

import json
import os
import shutil

import torch

from mindspeed_lora.errors import UserError

LATEST = "latest_checkpointed_iteration.txt"
METADATA = "mindspeed_lora.json"
HF_CONFIG_DIR = "hf_config"
CHECKPOINT_VERSION = 3.0


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def shard_dir_name(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def shard_path(iter_dir: str, tp_rank: int, pp_rank: int, pp_size: int) -> str:
    return os.path.join(iter_dir, shard_dir_name(tp_rank, pp_rank, pp_size), "model_optim_rng.pt")


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def staging_dir(save_dir: str, iteration: int, token: str) -> str:
    """Where an iteration is written before it is published."""
    return os.path.join(save_dir, f"{iteration_dir_name(iteration)}.tmp-{token}")


def publish_iteration(save_dir: str, iteration: int, token: str) -> str:
    """Rename the staged iteration into place, then point latest_checkpointed_iteration.txt at it."""
    staged = staging_dir(save_dir, iteration, token)
    final = os.path.join(save_dir, iteration_dir_name(iteration))
    if os.path.exists(final):  # re-saving the same iteration: keep the old until the new one is complete
        old = f"{final}.old-{token}"
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)
    atomic_write_text(os.path.join(save_dir, LATEST), str(iteration))
    return final


def read_latest_iteration(load_dir: str) -> int:
    path = os.path.join(load_dir, LATEST)
    if not os.path.isfile(path):
        raise UserError(f"{load_dir}: no {LATEST} (not a Megatron checkpoint directory)")
    text = open(path, encoding="utf-8").read().strip()
    if text == "release":
        return 0
    try:
        return int(text)
    except ValueError as e:
        raise UserError(f"{path}: expected an iteration number, found {text!r}") from e


def resolve_iteration_dir(load_dir: str, iteration: int | None = None) -> str:
    if iteration is None:
        iteration = read_latest_iteration(load_dir)
    name = "release" if iteration == 0 and os.path.isdir(os.path.join(load_dir, "release")) \
        else iteration_dir_name(iteration)
    path = os.path.join(load_dir, name)
    if not os.path.isdir(path):
        raise UserError(f"{load_dir}: {LATEST} points at {name}, which does not exist")
    return path


def load_shard(path: str) -> dict:
    """Load one model_optim_rng.pt; never runs code from the file."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: checkpoint shard missing (another TP/PP layout? see {METADATA})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: cannot load checkpoint shard ({e})") from e


def write_metadata(save_dir: str, metadata: dict) -> None:
    os.makedirs(save_dir, exist_ok=True)
    atomic_write_text(os.path.join(save_dir, METADATA), json.dumps(metadata, indent=2, sort_keys=True) + "\n")


def read_metadata(load_dir: str) -> dict | None:
    path = os.path.join(load_dir, METADATA)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from e
