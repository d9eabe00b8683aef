"""DPO on megatron-core: the SFT trainer's setup, optimizer, checkpoints and logs with a preference loss.

Each step runs the global batch twice through megatron's pipeline schedule (any TP/PP/DP/SP layout):

  1. reference, forward only, no grad: with LoRA the policy itself with its adapters off
     (``lora.toggle.adapters_disabled``: no second copy in memory); with full fine-tuning a frozen copy
     of the reference model built with the same layout. The last pipeline stage keeps each micro-batch's
     sequence log-probs on the micro-batch.
  2. policy, forward and backward: the last stage turns the policy's and the kept reference log-probs into
     the DPO loss (``dpo.loss``) and the reward metrics.

The reference-free losses (simpo, orpo) skip step 1 and build no reference model.

A micro-batch of M pairs is 2M rows (chosen, then rejected: ``data.pairwise_dataset``). GPTModel with labels
returns the vocab-parallel per-token cross-entropy -log p(label) [2M, s], so sequence log-probs are complete on
every TP rank without gathering logits. The loss of a micro-batch is the mean over its pairs; megatron averages
micro-batches and DP replicas, so the step's gradient is that of the mean over the global batch's pairs.

The full fine-tuning reference is ``--ref-load``, else the model the run started from: ``--load`` on a fresh
start; on a resume the model recorded under ``dpo_reference`` in the checkpoint's ``mindspeed_lora.json``
(the trained weights in ``--load`` are the policy, not the reference).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from contextlib import nullcontext
from functools import partial

import torch
import torch.distributed as dist

from mindspeed_lora.accelerator import get_accelerator
from mindspeed_lora.checkpoint import megatron_io
from mindspeed_lora.checkpoint.loading import LoadSource, arch_differences
from mindspeed_lora.data.pairwise_dataset import PairwiseIndexedDataset, check_pairwise_prefix, collate_pairs
from mindspeed_lora.data.sft_dataset import micro_batch_positions
from mindspeed_lora.dpo.loss import DPOConfig, SequenceLogps, dpo_loss, sequence_logps
from mindspeed_lora.errors import UserError
from mindspeed_lora.training import model as model_setup
from mindspeed_lora.training.config import TrainingConfig
from mindspeed_lora.training.sft import SFTTrainer, TrainResult, log_rank0

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen",
           "logps/rejected")


REFERENCE_KEY = "dpo_reference"
"""``mindspeed_lora.json`` key: the absolute path of a full fine-tuning DPO run's reference model."""


@dataclasses.dataclass
class DPORunConfig:
    training: TrainingConfig
    dpo: DPOConfig
    ref_load: str | None = None
    """--ref-load: the reference model (full fine-tuning only)."""


def config_from_args(args: argparse.Namespace) -> DPORunConfig:
    from mindspeed_lora.arguments.dpo import dpo_config_from_args
    from mindspeed_lora.training.config import training_config_from_args

    # training_config_from_args validates everything but the stage, which it only knows as "sft"
    training = training_config_from_args(argparse.Namespace(**{**vars(args), "stage": "sft"}))
    training.args["stage"] = args.stage
    return DPORunConfig(training, dpo_config_from_args(args), args.ref_load)


def _row_logps(output: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy [rows, s] -> (summed response log-probs [rows], response tokens [rows])."""
    return sequence_logps(-output.float(), loss_mask)


class DPOTrainer(SFTTrainer):
    """``setup()`` / ``train()`` / ``cleanup()`` as SFTTrainer; ``history`` holds (iteration, metrics) per step."""

    _check_data_prefix = staticmethod(check_pairwise_prefix)
    _open_dataset = staticmethod(PairwiseIndexedDataset)

    def __init__(self, cfg: TrainingConfig, dpo: DPOConfig, ref_load: str | None = None):
        super().__init__(cfg)
        self.dpo = dpo
        self.ref_load = ref_load
        self.reference = None
        """Full fine-tuning: the frozen reference chunk; None with LoRA (the policy with adapters off)."""
        self.reference_source: LoadSource | None = None
        self.reference_rope = None
        self.last_metrics: dict[str, float] = {}
        self.history: list[tuple[int, dict[str, float]]] = []

    # ------------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.batch.calculate_per_token_loss:
            raise UserError("--calculate-per-token-loss: the DPO loss is a mean over preference pairs; "
                            "drop the flag for --stage dpo")
        if cfg.data.neat_pack or cfg.data.reset_attention:
            raise UserError("--neat-pack / --reset-attention-mask / --reset-position-ids: pairwise data is not "
                            "packed; drop them for --stage dpo")
        if self.ref_load and not self.dpo.needs_reference:
            raise UserError(f"--ref-load {self.ref_load}: --dpo-loss-type {self.dpo.loss_type} uses no reference "
                            "model")
        if self.ref_load and cfg.lora is not None:
            raise UserError(f"--ref-load {self.ref_load}: with LoRA the reference is the --load model with its "
                            "adapters off; --ref-load is for full-parameter DPO")
        super().setup()
        if self.lora is None and self.dpo.needs_reference:
            self.reference_source = self._reference_source()
            self._build_reference()

    def _reference_source(self) -> LoadSource:
        """--ref-load; on a fresh start --load; on a resume the reference its checkpoint recorded."""
        cfg = self.cfg
        if self.ref_load:
            path, what = self.ref_load, "--ref-load"
        elif not self.resume:
            return self.source
        else:
            meta = os.path.join(self.source.path, megatron_io.METADATA)
            path = (self.source.metadata or {}).get(REFERENCE_KEY)
            if path is None:
                raise UserError(
                    f"--load {self.source.path}: a training checkpoint whose {meta} records no DPO reference model "
                    "(an SFT run's, or an older DPO run's); give --finetune to start DPO from these weights, or "
                    "--ref-load REFERENCE_DIR to resume a full-parameter DPO run against its reference")
            if not os.path.isdir(path):
                raise UserError(f"--load {self.source.path}: the DPO reference model recorded in {meta} ({path}) "
                                "is not there any more; give its new place with --ref-load")
            what = f"the DPO reference recorded in {meta}:"
        source = model_setup.inspect_load_dir(path, what)
        diffs = arch_differences(model_setup.resolve_arch(source, cfg.model, what), self.arch)
        if diffs:
            raise UserError(f"{what} {path}: a different model than --load ({'; '.join(diffs)}; reference vs "
                            "policy)")
        if source.kind == "megatron":
            if source.metadata.get("lora"):
                raise UserError(f"{what} {path}: a LoRA adapter checkpoint; the reference must be a whole model "
                                "(merge the adapter with convert_ckpt.py --lora-load first)")
            model_setup.check_layout(source, self.arch, cfg.parallel, what)
        return source

    def _checkpoint_metadata(self, iteration: int) -> dict:
        meta = super()._checkpoint_metadata(iteration)
        if self.reference_source is not None:  # what a resume compares against
            meta[REFERENCE_KEY] = os.path.abspath(self.reference_source.path)
        return meta

    def _build_reference(self) -> None:
        cfg, r = self.cfg, self.rank
        options = model_setup.model_options(cfg, [])
        ref, self.reference_rope = model_setup.build_stage_model(self.arch, cfg, options, r.is_first_stage,
                                                                 r.is_last_stage)
        model_setup.load_base_weights(ref, self.reference_source, self.arch, cfg.parallel, r.tp_rank, r.pp_rank)
        log_rank0(f"DPO reference model: {self.reference_source.path}")
        for p in ref.parameters():
            p.requires_grad_(False)
        self.reference = ref.eval()

    # ------------------------------------------------------------------------------------------ steps

    def _batches(self, order, start: int) -> list[dict]:
        r, b = self.rank, self.cfg.batch
        return [collate_pairs([self.dataset[i] for i in order.sample_at(pos)], self.collate_opts)
                for pos in micro_batch_positions(start, b.global_batch_size, b.micro_batch_size, r.dp_size,
                                                 r.dp_rank)]

    @staticmethod
    def _forward(model, rope, batch: dict) -> torch.Tensor:
        dev = get_accelerator().device()
        if rope is not None:
            rope.position_ids = None  # pairwise rows are never packed: positions 0..s-1
        return model(batch["tokens"].to(dev), batch["position_ids"].to(dev), None, labels=batch["labels"].to(dev))

    def _reference_step(self, data_iterator, model):
        batch = next(data_iterator)
        rope = self.reference_rope if self.reference is not None else self.rope
        return self._forward(model, rope, batch), partial(self._keep_reference, batch)

    @staticmethod
    def _keep_reference(batch: dict, output: torch.Tensor):
        logps, _ = _row_logps(output, batch["loss_mask"].to(output.device))
        batch["reference_logps"] = logps.detach()
        return torch.zeros((), device=output.device), {}

    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        return self._forward(model, self.rope, batch), partial(self._dpo_loss, batch)

    def _dpo_loss(self, batch: dict, output: torch.Tensor):
        m = batch["pairs"]
        logps, lengths = _row_logps(output, batch["loss_mask"].to(output.device))
        ref = batch.get("reference_logps")
        loss, metrics = dpo_loss(self.dpo, SequenceLogps(logps[:m], logps[m:], lengths[:m], lengths[m:]),
                                 None if ref is None else SequenceLogps(ref[:m], ref[m:], lengths[:m], lengths[m:]))
        # sums over the micro-batch's pairs, and the pair count: reduced over micro-batches and DP in _reduce_loss
        means = torch.stack([loss.detach()] + [metrics[k].float() for k in METRICS[1:]])
        report = torch.cat([means * m, torch.tensor([float(m)], device=means.device)])
        return loss, {"dpo": report}

    def _run_schedule(self, forward_step, chunks: list, batches: list[dict], forward_only: bool) -> list[dict]:
        return self.forward_backward(
            forward_step_func=forward_step, data_iterator=iter(batches), model=chunks,
            num_microbatches=len(batches), seq_length=batches[0]["tokens"].shape[1],
            micro_batch_size=2 * self.cfg.batch.micro_batch_size, forward_only=forward_only)

    def reference_pass(self, batches: list[dict]) -> None:
        """Reference log-probs of every micro-batch, kept on the batches (last pipeline stage)."""
        from mindspeed_lora.lora.toggle import adapters_disabled

        if self.reference is not None:
            chunks, switch = [self.reference], nullcontext()
        else:
            chunks, switch = self.chunks, adapters_disabled(self.model)
        modes = [c.training for c in chunks]
        for c in chunks:
            c.eval()  # no dropout: the reference is a fixed function of the batch
        try:
            with switch, torch.no_grad():
                self._run_schedule(self._reference_step, chunks, batches, forward_only=True)
        finally:
            for c, mode in zip(chunks, modes):
                c.train(mode)

    def _run_microbatches(self, batches: list[dict], forward_only: bool) -> list[dict]:
        if self.dpo.needs_reference:
            self.reference_pass(batches)
        return self._run_schedule(self._forward_step, self.chunks, batches, forward_only)

    def _reduce_loss(self, reported: list[dict]) -> float:
        """Mean loss and metrics over the global batch's pairs, on every rank; metrics go to ``last_metrics``."""
        from megatron.core import parallel_state as ps

        totals = torch.zeros(len(METRICS) + 1, dtype=torch.float64, device=get_accelerator().device())
        if self.rank.is_last_stage:
            totals += torch.stack([d["dpo"].double() for d in reported]).sum(0)
            dist.all_reduce(totals, group=ps.get_data_parallel_group())
        if self.rank.pp_size > 1:
            dist.all_reduce(totals, group=ps.get_pipeline_model_parallel_group())
        self.last_metrics = {k: float(totals[i] / totals[-1]) for i, k in enumerate(METRICS)}
        return self.last_metrics["loss"]

    def train_step(self, batches: list[dict]) -> tuple[float, float | None, bool]:
        out = super().train_step(batches)
        iteration = self.iteration + 1  # the loop counts the step after this returns
        self.history.append((iteration, dict(self.last_metrics)))
        if iteration % self.cfg.logging.log_interval == 0 or iteration == self.train_iters:
            if dist.get_rank() == 0:
                print(f" iteration {iteration:8d}/{self.train_iters:8d} | dpo | "
                      + " | ".join(f"{k}: {v:.6E}" for k, v in self.last_metrics.items()) + " |", flush=True)
            self.tb.scalars(iteration, dict(self.last_metrics))
        return out


def run(cfg: DPORunConfig) -> TrainResult:
    trainer = DPOTrainer(cfg.training, cfg.dpo, cfg.ref_load)
    trainer.setup()
    try:
        return trainer.train()
    finally:
        trainer.cleanup()
