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
start; on a resume the model recorded under ``dpo_reference`` (its directory) and ``dpo_reference_iteration``
in the checkpoint's ``mindspeed_lora.json`` (the trained weights in ``--load`` are the policy, not the
reference). ``--refer-model-iter N`` (MindSpeed-LLM's flag) makes it iteration N of ``--ref-load``, else of
``--load``, on a fresh start or a resume: MindSpeed-LLM saves into the directory it loaded, so there the
reference of a resume is the converted iteration 1 while the policy resumes from the latest.
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
REFERENCE_ITERATION_KEY = "dpo_reference_iteration"
"""``mindspeed_lora.json`` key: the iteration of a Megatron checkpoint reference (null for an HF dir). Absent
in checkpoints of older versions, which read the latest iteration of the reference directory."""


@dataclasses.dataclass
class DPORunConfig:
    training: TrainingConfig
    dpo: DPOConfig
    ref_load: str | None = None
    """--ref-load: the reference model (full fine-tuning only)."""
    refer_model_iter: int | None = None
    """--refer-model-iter: the reference is this iteration of --ref-load, else of --load (full fine-tuning)."""

    def __post_init__(self):
        megatron_io.check_iteration_flag("--refer-model-iter", self.refer_model_iter)


def config_from_args(args: argparse.Namespace) -> DPORunConfig:
    from mindspeed_lora.arguments.dpo import dpo_config_from_args
    from mindspeed_lora.training.config import training_config_from_args

    # training_config_from_args validates everything but the stage, which it only knows as "sft"
    training = training_config_from_args(argparse.Namespace(**{**vars(args), "stage": "sft"}))
    training.args["stage"] = args.stage
    return DPORunConfig(training, dpo_config_from_args(args), args.ref_load, args.refer_model_iter)


def _row_logps(output: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy [rows, s] -> (summed response log-probs [rows], response tokens [rows])."""
    return sequence_logps(-output.float(), loss_mask)


class DPOTrainer(SFTTrainer):
    """``setup()`` / ``train()`` / ``cleanup()`` as SFTTrainer; ``history`` holds (iteration, metrics) per step."""

    _check_data_prefix = staticmethod(check_pairwise_prefix)
    _open_dataset = staticmethod(PairwiseIndexedDataset)

    def __init__(self, cfg: TrainingConfig, dpo: DPOConfig, ref_load: str | None = None,
                 refer_model_iter: int | None = None):
        super().__init__(cfg)
        self.dpo = dpo
        self.ref_load = ref_load
        self.refer_model_iter = refer_model_iter
        self.reference = None
        """Full fine-tuning: the frozen reference chunk; None with LoRA (the policy with adapters off)."""
        self.reference_source: LoadSource | None = None
        self.reference_rope = None
        self.last_metrics: dict[str, float] = {}
        self.history: list[tuple[int, dict[str, float]]] = []

    @classmethod
    def of(cls, run: DPORunConfig) -> DPOTrainer:
        """The trainer of a parsed DPO run (``config_from_args``)."""
        return cls(run.training, run.dpo, run.ref_load, run.refer_model_iter)

    # ------------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.batch.calculate_per_token_loss:
            raise UserError("--calculate-per-token-loss: the DPO loss is a mean over preference pairs; "
                            "drop the flag for --stage dpo")
        if cfg.data.neat_pack or cfg.data.reset_attention:
            raise UserError("--neat-pack / --reset-attention-mask / --reset-position-ids: pairwise data is not "
                            "packed; drop them for --stage dpo")
        for flag, value in (("--ref-load", self.ref_load), ("--refer-model-iter", self.refer_model_iter)):
            if value is None:
                continue
            if not self.dpo.needs_reference:
                raise UserError(f"{flag} {value}: --dpo-loss-type {self.dpo.loss_type} uses no reference model")
            if cfg.lora is not None:
                raise UserError(f"{flag} {value}: with LoRA the reference is the --load model with its adapters "
                                f"off; {flag} is for full-parameter DPO")
        # before the slow part: a missing directory or iteration, or an HF dir with an iteration, fails at once
        asked = self._asked_reference() if self.ref_load or self.refer_model_iter is not None else None
        super().setup()
        if self.lora is None and self.dpo.needs_reference:
            self.reference_source = self._checked_reference(*(asked or self._default_reference()))
            self._build_reference()

    def _asked_reference(self) -> tuple[LoadSource, str]:
        """--ref-load (iteration --refer-model-iter, else its latest), or iteration --refer-model-iter of --load."""
        load = self.cfg.model.load
        path, what = (self.ref_load, "--ref-load") if self.ref_load else (load, "--load")
        try:
            return model_setup.inspect_load_dir(path, what, self.refer_model_iter, "--refer-model-iter"), what
        except UserError as e:
            recorded = megatron_io.read_metadata(load) if not self.ref_load and os.path.isdir(load) else None
            if not recorded or REFERENCE_KEY not in recorded:
                raise
            # a MindSpeed-LLM habit (--refer-model-iter 1) on a checkpoint that knows its reference
            iteration = recorded.get(REFERENCE_ITERATION_KEY)
            raise UserError(f"{e}; without --refer-model-iter a resume compares against the reference the "
                            f"checkpoint recorded ({recorded[REFERENCE_KEY]}"
                            + (f", iteration {iteration})" if iteration is not None else ")")) from None

    def _default_reference(self) -> tuple[LoadSource, str]:
        """On a fresh start the model the policy starts from (--load, its --ckpt-step); on a resume the reference
        its checkpoint recorded (directory and iteration)."""
        if not self.resume:
            return self.source, "--load"
        load = self.source.path
        meta = os.path.join(load, megatron_io.METADATA)
        recorded = self.source.metadata or {}
        path = recorded.get(REFERENCE_KEY)
        if path is None:
            raise UserError(
                f"--load {load}: a training checkpoint whose {meta} records no DPO reference model (an SFT run's, "
                "or an older DPO run's); give --finetune to start DPO from these weights, or --ref-load "
                "REFERENCE_DIR to resume a full-parameter DPO run against its reference")
        if not os.path.isdir(path):
            raise UserError(f"--load {load}: the DPO reference model recorded in {meta} ({path}) is not there any "
                            "more; give its new place with --ref-load (and its iteration with --refer-model-iter)")
        iteration = recorded.get(REFERENCE_ITERATION_KEY)
        if REFERENCE_ITERATION_KEY not in recorded and megatron_io.read_metadata(path) is not None:
            # an older version's record: it meant the latest iteration of that directory when the run started.
            # That is still the reference unless the run saved into that directory since: then the latest is the
            # trained policy, and the iteration the run started from is recorded nowhere.
            if os.path.realpath(path) in {os.path.realpath(d) for d in (load, self.cfg.checkpoint.save) if d}:
                raise UserError(
                    f"--load {load}: {meta} records the DPO reference as {path} without an iteration (an older "
                    "version's record, meaning that directory's latest iteration when the run started); the run "
                    "has saved its trained weights there since: give the iteration it started from with "
                    "--refer-model-iter N (1 for a checkpoint made by convert_ckpt.py)")
            log_rank0(f"note: {meta} records the DPO reference without an iteration (an older version's record): "
                      f"the latest iteration of {path}, as that version read it")
        what = f"the DPO reference recorded in {meta}:"
        try:
            return model_setup.inspect_load_dir(path, what, iteration, REFERENCE_ITERATION_KEY), what
        except UserError as e:
            raise UserError(f"{e}; give the reference with --ref-load DIR --refer-model-iter N") from None

    def _checked_reference(self, source: LoadSource, what: str) -> LoadSource:
        """``source`` after refusing another model, a LoRA adapter, or another TP/PP layout than the policy's."""
        if source is self.source:
            return source
        cfg, path = self.cfg, source.path
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
            meta[REFERENCE_ITERATION_KEY] = self.reference_source.iteration  # None for an HF dir
        return meta

    def _build_reference(self) -> None:
        cfg, r = self.cfg, self.rank
        options = model_setup.model_options(cfg, [])
        ref, self.reference_rope = model_setup.build_stage_model(self.arch, cfg, options, r.is_first_stage,
                                                                 r.is_last_stage)
        model_setup.load_base_weights(ref, self.reference_source, self.arch, cfg.parallel, r.tp_rank, r.pp_rank)
        src = self.reference_source
        log_rank0(f"DPO reference model: {src.path}" + (f", iteration {src.iteration}" if src.iteration is not None
                                                         else ""))
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
    trainer = DPOTrainer.of(cfg)
    trainer.setup()
    try:
        return trainer.train()
    finally:
        trainer.cleanup()
