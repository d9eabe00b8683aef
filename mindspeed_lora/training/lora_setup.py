"""LoRA in a training run: spec hook, adapter init and freezing, adapter checkpoints (save, load, checks).

The adapters come from ``mindspeed_lora.lora``; this module ties them to the run: the layer-spec hook goes
into the model build, ``prepare`` (after the base weights are loaded) initialises adapters from --seed by
their global layer names (the same values at any TP/PP layout), freezes everything else and makes the
first stage's block input require grad (full recompute), and ``load`` refuses an adapter checkpoint of
another layout, model or LoRA shape before copying this rank's adapter shard.
"""
from __future__ import annotations

import os

import torch

from mindspeed_lora.checkpoint import megatron_io
from mindspeed_lora.checkpoint.lora_layout import LoraCheckpointConfig
from mindspeed_lora.errors import UserError
from mindspeed_lora.models.arch import ModelArch
from mindspeed_lora.models.builder import ParallelOptions
from mindspeed_lora.training.model import check_layout, inspect_load_dir

METADATA_KEYS = ("r", "alpha", "dropout", "target_modules", "use_rslora")
# recorded with an adapter checkpoint; all but dropout must agree with a run that loads it
# (LoraCheckpointConfig.mismatch)


class LoraSetup:
    def __init__(self, config, arch: ModelArch, parallel: ParallelOptions, seed: int):
        self.config = config
        self.arch = arch
        self.parallel = parallel
        self.seed = seed
        self._embedding_hook = None

    def spec_hooks(self) -> list:
        from mindspeed_lora.lora import lora_spec_hook

        return [lora_spec_hook(self.config)]

    def prepare(self, model) -> None:
        from mindspeed_lora.lora import prepare_lora_model

        self._embedding_hook = prepare_lora_model(model, self.seed)

    def metadata(self) -> dict:
        d = self.config.to_dict()
        return {k: d[k] for k in METADATA_KEYS}

    def adapter_state(self, model) -> dict[str, torch.Tensor]:
        from mindspeed_lora.lora import adapter_state_dict

        return adapter_state_dict(model)

    def check_checkpoint(self, path: str, iteration: int | None = None) -> None:
        """Refuse an adapter checkpoint of another TP/PP layout, base model or LoRA shape, or without
        ``iteration`` (--ckpt-step)."""
        if not os.path.isdir(path):
            raise UserError(f"--lora-load {path}: no such directory")
        if megatron_io.read_metadata(path) is None:
            raise UserError(f"--lora-load {path}: no {megatron_io.METADATA} (not a LoRA checkpoint of this project)")
        source = inspect_load_dir(path, "--lora-load", iteration)
        check_layout(source, self.arch, self.parallel, what="--lora-load")
        saved = source.metadata.get("lora")
        where = os.path.join(path, megatron_io.METADATA)
        if not saved:
            raise UserError(f"--lora-load {path}: {where} records no LoRA settings (a full-weight checkpoint? "
                            "give it to --load instead)")
        diffs = LoraCheckpointConfig.from_metadata(saved, where).mismatch(LoraCheckpointConfig.of(self.config))
        if diffs:
            raise UserError(f"--lora-load {path}: trained with other LoRA settings ({'; '.join(diffs)}; checkpoint "
                            "vs this run's --lora-r / --lora-alpha / --lora-target-modules / --lora-use-rslora)")

    def load(self, model, path: str, rank, iteration: int | None = None) -> tuple[str, dict | None]:
        """Copy this rank's adapter shard of ``iteration`` (else the latest) into ``model``; returns (shard path,
        shard dict or None) for resuming."""
        from mindspeed_lora.checkpoint import loading
        from mindspeed_lora.training.checkpointing import read_training_state

        self.check_checkpoint(path, iteration)
        loading.load_lora_weights(model, path, self.metadata(), self.parallel, rank.tp_rank, rank.pp_rank, iteration)
        return read_training_state(path, rank, iteration)
