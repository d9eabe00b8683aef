"""DPO on megatron-core: the SFT trainer's setup, optimizer, checkpoints and logs with a preference loss.

Each step runs the global batch twice through megatron's pipeline schedule (any TP/PP/DP/SP layout):

  1. reference, forward only, no grad: with LoRA the policy itself with its adapters off
     (``lora.toggle.adapters_disabled``: no second copy in memory); with full fine-tuning a frozen copy
     of ``--load`` built with the same layout. The last pipeline stage keeps each micro-batch's sequence
     log-probs on the micro-batch.
  2. policy, forward and backward: the last stage turns the policy's and the kept reference log-probs into
     the DPO loss (``dpo.loss``) and the reward metrics.

A micro-batch of M pairs is 2M rows (chosen, then rejected: ``data.pairwise_dataset``). GPTModel with labels
returns the vocab-parallel per-token cross-entropy -log p(label) [2M, s], so sequence log-probs are complete on
every TP rank without gathering logits. The loss of a micro-batch is the mean over its pairs; megatron averages
micro-batches and DP replicas, so the step's gradient is that of the mean over the global batch's pairs.
"""
from __future__ import annotations

import argparse
import dataclasses
from contextlib import nullcontext
from functools import partial

import torch
import torch.distributed as dist

from mindspeed_lora.accelerator import get_accelerator
from mindspeed_lora.data.pairwise_dataset import PairwiseIndexedDataset, check_pairwise_prefix, collate_pairs
from mindspeed_lora.data.sft_dataset import micro_batch_positions
from mindspeed_lora.dpo.loss import DPOConfig, SequenceLogps, dpo_loss, sequence_logps
from mindspeed_lora.errors import UserError
from mindspeed_lora.training import model as model_setup
from mindspeed_lora.training.config import TrainingConfig
from mindspeed_lora.training.sft import SFTTrainer, TrainResult

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen",
           "logps/rejected")


@dataclasses.dataclass
class DPORunConfig:
    training: TrainingConfig
    dpo: DPOConfig


def config_from_args(args: argparse.Namespace) -> DPORunConfig:
    from mindspeed_lora.arguments.dpo import dpo_config_from_args
    from mindspeed_lora.training.config import training_config_from_args

    # training_config_from_args validates everything but the stage, which it only knows as "sft"
    training = training_config_from_args(argparse.Namespace(**{**vars(args), "stage": "sft"}))
    training.args["stage"] = args.stage
    return DPORunConfig(training, dpo_config_from_args(args))


def _row_logps(output: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy [rows, s] -> (summed response log-probs [rows], response tokens [rows])."""
    return sequence_logps(-output.float(), loss_mask)


class DPOTrainer(SFTTrainer):
    """``setup()`` / ``train()`` / ``cleanup()`` as SFTTrainer; ``history`` holds (iteration, metrics) per step."""

    _check_data_prefix = staticmethod(check_pairwise_prefix)
    _open_dataset = staticmethod(PairwiseIndexedDataset)

    def __init__(self, cfg: TrainingConfig, dpo: DPOConfig):
        super().__init__(cfg)
        self.dpo = dpo
        self.reference = None
        """Full fine-tuning: the frozen reference chunk; None with LoRA (the policy with adapters off)."""
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
        super().setup()
        if self.lora is None:
            if self.resume:
                # the reference must be the model DPO started from, which a training checkpoint no longer holds
                raise UserError(f"--load {cfg.model.load}: resuming full-parameter DPO from a training checkpoint "
                                "is not supported (the reference model would be the trained weights); give "
                                "--finetune to start a new DPO run from these weights")
            self._build_reference()

    def _build_reference(self) -> None:
        cfg, r = self.cfg, self.rank
        options = model_setup.model_options(cfg, [])
        ref, self.reference_rope = model_setup.build_stage_model(self.arch, cfg, options, r.is_first_stage,
                                                                 r.is_last_stage)
        model_setup.load_base_weights(ref, self.source, self.arch, cfg.parallel, r.tp_rank, r.pp_rank)
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
        ref = batch["reference_logps"]
        loss, metrics = dpo_loss(self.dpo, SequenceLogps(logps[:m], logps[m:], lengths[:m], lengths[m:]),
                                 SequenceLogps(ref[:m], ref[m:], lengths[:m], lengths[m:]))
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
    trainer = DPOTrainer(cfg.training, cfg.dpo)
    trainer.setup()
    try:
        return trainer.train()
    finally:
        trainer.cleanup()
