"""Load checkpoint weights into an already-built model chunk (training and inference call these).

``load_dir`` is an HF model dir (sliced per rank from safetensors) or a Megatron checkpoint written by this
project (this rank's shard, which must have been saved with the run's TP/PP layout). The model may hold
LoRA-wrapped linears: their base weights are ``<linear>.base_layer.weight`` in the model and
``<linear>.weight`` in a base checkpoint; adapters load separately with ``load_lora_weights``.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from mindspeed_lora.checkpoint import megatron_io
from mindspeed_lora.checkpoint.lora_layout import LoraCheckpointConfig
from mindspeed_lora.checkpoint.sources import MegatronCheckpoint, first_of
from mindspeed_lora.errors import UserError
from mindspeed_lora.models.arch import ModelArch
from mindspeed_lora.models.builder import ParallelOptions, layer_counts
from mindspeed_lora.models.family import read_hf_config


@dataclasses.dataclass(frozen=True)
class LoadSource:
    """What a ``--load`` directory holds."""

    path: str
    kind: str
    """"hf" (an HF model directory) or "megatron" (a converted or training checkpoint)."""
    metadata: dict | None = None
    """A Megatron checkpoint's ``mindspeed_lora.json``."""
    iteration: int | None = None
    """The Megatron checkpoint's iteration to read: the one asked for, else the latest when inspected. None for an
    HF dir, and in a LoadSource built by hand: the latest when read."""


def inspect_load_dir(path: str, what: str = "--load", iteration: int | None = None,
                     asked_by: str = "--ckpt-step") -> LoadSource:
    """An HF model dir or a Megatron checkpoint of this project (its ``iteration``, else its latest); anything
    else is a UserError saying why. ``asked_by`` is the flag that gave ``iteration``, for messages."""
    if not os.path.isdir(path):
        raise UserError(f"{what} {path}: no such directory")
    meta = megatron_io.read_metadata(path)
    if meta is not None:
        megatron_io.resolve_iteration_dir(path, iteration, f"{asked_by} {iteration}: {what}")  # it is there
        if iteration is None:
            iteration = megatron_io.read_latest_iteration(path)
        return LoadSource(path, "megatron", meta, iteration)
    if os.path.isfile(os.path.join(path, megatron_io.LATEST)):
        raise UserError(f"{what} {path}: a Megatron checkpoint without {megatron_io.METADATA} (MindSpeed-LLM's "
                        "or Megatron-LM's?); import it once with convert_ckpt.py --load-model-type mg "
                        f"--save-model-type mg --load-dir {path} --save-dir NEW_DIR --hf-cfg-dir HF_MODEL_DIR "
                        "(the HF model it was converted from), or pass the HF model directory to " + what)
    if os.path.isfile(os.path.join(path, "config.json")):
        if iteration is not None:
            raise UserError(f"{asked_by} {iteration}: {what} {path} is an HF model directory (one set of weights, "
                            "no iterations)")
        return LoadSource(path, "hf")
    raise UserError(f"{what} {path}: neither a Megatron checkpoint ({megatron_io.LATEST} + {megatron_io.METADATA}) "
                    "nor an HF model directory (config.json)")


def resolve_arch(load_dir: str, what: str = "--load", iteration: int | None = None) -> ModelArch:
    """The architecture saved beside a Megatron checkpoint (``mindspeed_lora.json``), or an HF dir's config.json."""
    source = inspect_load_dir(load_dir, what, iteration)
    if source.kind == "megatron":
        return MegatronCheckpoint(load_dir, what, iteration=source.iteration).arch
    return ModelArch.from_hf_config(read_hf_config(load_dir), os.path.join(load_dir, "config.json"))


def resolve_lora_config(lora_dir: str, iteration: int | None = None):
    """The LoRA settings a LoRA checkpoint was saved with, as the LoRA layers' ``LoraConfig``."""
    from mindspeed_lora.lora.config import LoraConfig

    ckpt = MegatronCheckpoint(lora_dir, "--lora-load", iteration=iteration)
    if ckpt.lora is None:
        raise UserError(f"--lora-load {lora_dir}: {megatron_io.METADATA} has no LoRA config ('lora' is null)")
    return LoraConfig.from_dict(ckpt.lora.to_metadata(), os.path.join(lora_dir, megatron_io.METADATA))


def arch_differences(a: ModelArch, b: ModelArch) -> list[str]:
    """'field a-value vs b-value' for each architecture field that differs (the storage dtype does not count)."""
    return [f"{f.name} {getattr(a, f.name)!r} vs {getattr(b, f.name)!r}" for f in dataclasses.fields(ModelArch)
            if f.name != "torch_dtype" and getattr(a, f.name) != getattr(b, f.name)]


def check_layout(ckpt: MegatronCheckpoint, arch: ModelArch, parallel: ParallelOptions) -> None:
    """Refuse a checkpoint of another model, or one saved with another TP/PP layout than this run's."""
    # the model first: resharding cannot fix a different one
    diffs = arch_differences(ckpt.arch, arch)
    if diffs:
        raise UserError(f"{ckpt.what} {ckpt.path}: a different model ({'; '.join(diffs)}; checkpoint vs this run)")
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    counts, saved = layer_counts(arch, parallel), layer_counts(ckpt.arch, ckpt.parallel)
    if (ckpt.tp, ckpt.pp) != (tp, pp) or counts != saved:
        raise UserError(
            f"{ckpt.what} {ckpt.path}: saved with tensor-model-parallel-size {ckpt.tp}, pipeline-model-parallel-size "
            f"{ckpt.pp} (layers per stage {saved}); this run uses {tp}, {pp} ({counts}). Reshard it with "
            f"convert_ckpt.py --load-model-type mg --save-model-type mg --load-dir {ckpt.path} --save-dir NEW_DIR "
            f"--target-tensor-parallel-size {tp} --target-pipeline-parallel-size {pp}"
            + (f" --num-layer-list {','.join(map(str, counts))}" if pp > 1 else ""))


def params_by_checkpoint_key(model, adapters: bool = False) -> dict[str, torch.Tensor]:
    """The model's weights as a checkpoint names them: base weights (``.base_layer.`` folded away), or with
    ``adapters`` the LoRA A/B only; never megatron's ``_extra_state``."""
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict(keep_vars=True).items()
            if not k.endswith("_extra_state") and (".lora_" in k) == adapters}


def _copy_shard(model_params: dict, ckpt: MegatronCheckpoint, keys: set[str], tp_rank: int, pp_rank: int) -> None:
    path = ckpt.shard(tp_rank, pp_rank).path
    missing, unexpected = sorted(set(model_params) - keys), sorted(keys - set(model_params))
    if missing:
        raise UserError(f"{path}: no tensor {first_of(missing)}, which the model has")
    if unexpected:
        raise UserError(f"{path}: tensor {first_of(unexpected)} is not in the model")
    with torch.no_grad():
        for key, param in model_params.items():
            t = ckpt.read(tp_rank, pp_rank, key)
            if tuple(t.shape) != tuple(param.shape):
                raise UserError(f"{path}: {key} has shape {tuple(t.shape)}; the model expects {tuple(param.shape)}")
            param.copy_(t.to(param.dtype))


def load_base_weights(model, load_dir: str, arch: ModelArch, parallel: ParallelOptions, tp_rank: int,
                      pp_rank: int, iteration: int | None = None) -> None:
    """Copy this rank's base weights from an HF dir or a Megatron checkpoint (its ``iteration``, else its latest)
    into ``model`` (stage ``pp_rank``)."""
    source = inspect_load_dir(load_dir, iteration=iteration)
    if source.kind == "hf":
        from mindspeed_lora.checkpoint.hf_reader import HFCheckpointReader
        from mindspeed_lora.checkpoint.weight_map import load_hf_weights

        load_hf_weights(model, HFCheckpointReader(load_dir), arch, parallel, tp_rank, pp_rank)
        return
    ckpt = MegatronCheckpoint(load_dir, "--load", iteration=source.iteration)
    check_layout(ckpt, arch, parallel)
    if not ckpt.has_base:
        raise UserError(f"--load {load_dir}: holds LoRA tensors only; the base model's checkpoint goes to --load "
                        "and this one to --lora-load")
    keys = {k for k in ckpt.shard_keys(tp_rank, pp_rank) if ".lora_" not in k}
    _copy_shard(params_by_checkpoint_key(model, adapters=False), ckpt, keys, tp_rank, pp_rank)


def load_lora_weights(model, lora_dir: str, lora_config, parallel: ParallelOptions, tp_rank: int,
                      pp_rank: int, iteration: int | None = None) -> None:
    """Copy this rank's LoRA A/B from a LoRA checkpoint (its ``iteration``, else its latest) into the model's
    LoRA-wrapped linears.

    ``lora_config`` is the run's LoRA setting (this module's ``LoraCheckpointConfig``, a metadata dict, or any
    object with r / alpha / target_modules / use_rslora); a checkpoint trained with another rank, alpha or
    target set is refused. None takes the checkpoint's own setting.
    """
    ckpt = MegatronCheckpoint(lora_dir, "--lora-load", iteration=iteration)
    if not ckpt.has_adapter:
        raise UserError(f"--lora-load {lora_dir}: no LoRA tensors (lora_A / lora_B) in its shards")
    wanted = LoraCheckpointConfig.of(lora_config) if lora_config is not None else None
    lora = ckpt.adapter_config(wanted)
    check_layout(ckpt, ckpt.arch, parallel)
    keys = {k for k in ckpt.shard_keys(tp_rank, pp_rank) if ".lora_" in k}
    params = params_by_checkpoint_key(model, adapters=True)
    if not params:
        raise UserError(f"--lora-load {lora_dir}: the model has no LoRA layers (LoRA targets "
                        f"{list(lora.target_modules)} expected)")
    for key in sorted(keys):
        if key.endswith(".lora_A.default.weight"):
            r = ckpt.shard(tp_rank, pp_rank).shape(ckpt.shard_keys(tp_rank, pp_rank)[key])[0]
            if r != lora.r:
                raise UserError(f"{ckpt.shard(tp_rank, pp_rank).path}: {key} has rank {r}; the LoRA config says "
                                f"r={lora.r}")
    _copy_shard(params, ckpt, keys, tp_rank, pp_rank)
