"""Supervised fine-tuning on megatron-core: setup, train, cleanup.

The step is megatron's own machinery: ``get_forward_backward_func`` (no pipelining or 1F1B), megatron's
``DistributedDataParallel`` and ``finalize_model_grads`` (DP reduction, SP/tied-embedding grad
all-reduces), ``get_megatron_optimizer`` (distributed or not) and ``OptimizerParamScheduler``. This module
supplies the data, the loss, checkpoints and reporting.

Loss: GPTModel returns per-token cross-entropy [b, s] for the shifted labels; a micro-batch contributes
(sum of masked losses, number of target tokens). By default megatron divides each micro-batch's sum by its
token count and averages over the micro-batches of the global batch (MindSpeed-LLM's SFT loss);
``--calculate-per-token-loss`` averages over all target tokens of the global batch instead.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import time
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist

from mindspeed_lora.accelerator import get_accelerator
from mindspeed_lora.data.sft_dataset import (
    CollateOptions,
    SFTIndexedDataset,
    check_data_prefix,
    collate,
    micro_batch_positions,
    split_orders,
)
from mindspeed_lora.errors import UserError
from mindspeed_lora.training import checkpointing, metrics
from mindspeed_lora.training import model as model_setup
from mindspeed_lora.training.config import TrainingConfig
from mindspeed_lora.training.exiting import ExitWatch


class TrainingStopped(UserError):
    """The loss became NaN/inf; the weights were not updated and the last checkpoint stays the latest."""


@dataclass
class TrainResult:
    iteration: int = 0
    """Last completed iteration."""
    start_iteration: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    grad_norms: list[tuple[int, float | None]] = field(default_factory=list)
    learning_rates: list[tuple[int, float]] = field(default_factory=list)
    valid_losses: list[tuple[int, float]] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    """Iterations whose update was skipped (fp16 loss-scale overflow)."""
    checkpoints: list[str] = field(default_factory=list)
    loss_curve: str | None = None
    exit_reason: str | None = None
    """Why training stopped before --train-iters (--exit-signal-handler / --exit-interval / duration)."""


def log_rank0(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


@contextlib.contextmanager
def manual_gc(on: bool):
    """--manual-gc: the threshold collector off for the loop (megatron-LM's flag). What setup built is frozen
    out of collection first, so a manual collection scans only what training allocated since."""
    if not on:
        yield
        return
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


class SFTTrainer:
    """One fine-tuning run: ``setup()`` builds everything, ``train()`` runs the loop, ``cleanup()`` closes logs."""

    def __init__(self, cfg: TrainingConfig):
        self.cfg = cfg
        self.lora = None  # LoRA glue (mindspeed_lora.training.lora_setup) when cfg.lora is set

    # the data format: overridden by trainers of other stages (DPO reads pairwise files)
    _check_data_prefix = staticmethod(check_data_prefix)
    _open_dataset = staticmethod(SFTIndexedDataset)

    # ------------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from mindspeed_lora.parallel import initialize

        cfg = self.cfg
        par = cfg.parallel
        self._check_data_prefix(cfg.data.data_path)  # before the slow imports: a typo fails in a second
        for note in cfg.notes:
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"note: {note}", flush=True)
        self.source = model_setup.inspect_load_dir(cfg.model.load, iteration=cfg.checkpoint.load_iteration)
        self.arch = model_setup.resolve_arch(self.source, cfg.model)
        self.arch.check_tensor_parallel(par.tensor_model_parallel_size)
        self.arch.check_context(cfg.data.seq_length, "--seq-length")
        if self.source.kind == "megatron":
            if self.source.metadata.get("lora"):
                raise UserError(f"--load {cfg.model.load}: a LoRA adapter checkpoint; give the base model to --load "
                                "and the adapter to --lora-load (with the same --lora-* settings)")
            model_setup.check_layout(self.source, self.arch, par)
        if cfg.deterministic:  # before the process group: the collective libraries read the environment then
            get_accelerator().use_deterministic_algorithms()
        self.rank = initialize(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, seed=cfg.seed,
                               verbose_patches=True)
        self.microbatches = cfg.batch.microbatches(self.rank.dp_size)
        self._setup_data()

        if cfg.lora is not None:
            from mindspeed_lora.training.lora_setup import LoraSetup

            self.lora = LoraSetup(cfg.lora, self.arch, par, cfg.seed)
            if cfg.checkpoint.lora_load:  # before the slow part: a mismatched adapter fails at once
                self.lora.check_checkpoint(cfg.checkpoint.lora_load, cfg.checkpoint.lora_load_iteration)
        hooks = self.lora.spec_hooks() if self.lora else []
        options = model_setup.model_options(cfg, hooks)
        model, self.rope = model_setup.build_stage_model(self.arch, cfg, options, self.rank.is_first_stage,
                                                         self.rank.is_last_stage)
        model_setup.load_base_weights(model, self.source, self.arch, par, self.rank.tp_rank, self.rank.pp_rank)

        # where a resumed run's optimizer, scheduler, RNG and data position come from
        resume_path, resume_state = None, None
        if self.lora is not None:
            self.lora.prepare(model)
            if cfg.checkpoint.lora_load:
                resume_path, resume_state = self.lora.load(model, cfg.checkpoint.lora_load, self.rank,
                                                           cfg.checkpoint.lora_load_iteration)
        elif self.source.kind == "megatron" and not cfg.checkpoint.finetune:
            resume_path, resume_state = checkpointing.read_training_state(self.source.path, self.rank,
                                                                          self.source.iteration)
        self.resume = resume_state is not None and not cfg.checkpoint.finetune
        self.model = model
        if cfg.fused_cross_entropy and self.rank.is_last_stage:
            # the output weight: the tied embedding, or the last stage's copy of it
            self._ce_weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights \
                else model.output_layer.weight

        self.ddp = model_setup.wrap_ddp(model, cfg)
        self.chunks = [self.ddp]
        self.optimizer, self.scheduler = model_setup.build_optimizer(self.chunks, cfg, self.train_iters)
        mcfg = model.config
        mcfg.finalize_model_grads_func = finalize_model_grads
        mcfg.grad_scale_func = self.optimizer.scale_loss
        if cfg.optim.overlap_grad_reduce:
            mcfg.no_sync_func = self.ddp.no_sync
            mcfg.grad_sync_func = self.ddp.start_grad_sync
        self.forward_backward = get_forward_backward_func()

        self.iteration, self.consumed = 0, 0
        if self.resume:
            self.iteration, self.consumed = checkpointing.restore_training_state(
                resume_path, resume_state, optimizer=self.optimizer, scheduler=self.scheduler, rank=self.rank,
                load_optim=cfg.checkpoint.load_optim, load_rng=cfg.checkpoint.load_rng)
            log_rank0(f"resuming from {resume_path} at iteration {self.iteration} "
                      f"({self.consumed} samples consumed)")
        elif resume_path is not None:
            log_rank0(f"{resume_path} holds weights only: starting at iteration 0")
        self.tb = metrics.TensorBoardLog(cfg.logging.tensorboard_dir if dist.get_rank() == 0 else None)
        self.lora_training = self.lora is not None
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_total = sum(p.numel() for p in model.parameters())
        log_rank0(f"model {self.arch.family}: {self.arch.num_layers} layers, hidden {self.arch.hidden_size}; "
                  f"TP {self.rank.tp_size} PP {self.rank.pp_size} DP {self.rank.dp_size}; rank 0 trains "
                  f"{n_trainable:,} of {n_total:,} parameters ({'LoRA' if self.lora else 'full fine-tuning'})")

    def _setup_data(self) -> None:
        cfg = self.cfg
        d = cfg.data
        self.dataset = self._open_dataset(d.data_path)
        self.dataset.check_fits(d.seq_length)
        self.train_order, self.valid_order = split_orders(len(self.dataset), d.split, d.seed, d.shuffle)
        if len(self.train_order) == 0:
            raise UserError(f"--split {d.split}: leaves no training samples out of {len(self.dataset)}")
        if cfg.logging.eval_iters and cfg.logging.eval_interval and len(self.valid_order) == 0:
            raise UserError(f"--eval-iters {cfg.logging.eval_iters}: --split {d.split} leaves no validation samples")
        segments = "none"
        has_ids = self.dataset.has_segment_ids()
        eod = None
        if d.neat_pack or d.reset_attention:
            segments = "ids" if d.neat_pack or has_ids else "eod"
            if segments == "eod":
                eod = self._eod_id()
        elif has_ids:
            log_rank0("warning: attention_mask holds neat-pack segment ids but neither --neat-pack nor "
                      "--reset-attention-mask is set: packed samples will attend to each other")
        multiple = 8
        if cfg.parallel.sequence_parallel:
            multiple = math.lcm(8, cfg.parallel.tensor_model_parallel_size)
        if d.pad_to_seq_length and d.seq_length % multiple and cfg.parallel.sequence_parallel:
            raise UserError(f"--seq-length {d.seq_length} is not a multiple of the tensor-parallel size "
                            f"{cfg.parallel.tensor_model_parallel_size} (needed by --sequence-parallel)")
        self.collate_opts = CollateOptions(seq_length=d.seq_length, pad_to_seq_length=d.pad_to_seq_length,
                                           multiple=multiple, segments=segments, eod_id=eod)
        b = cfg.batch
        if b.train_iters is not None:
            self.train_iters = b.train_iters
        else:
            self.train_iters = max(1, int(b.train_epochs * len(self.train_order)) // b.global_batch_size)
        log_rank0(f"data {d.data_path}: {len(self.dataset)} samples, {len(self.train_order)} train, "
                  f"{len(self.valid_order)} valid; {self.train_iters} iterations of {b.global_batch_size} samples "
                  f"({self.train_iters * b.global_batch_size / len(self.train_order):.2f} epochs)")

    def _eod_id(self) -> int:
        if not self.cfg.data.tokenizer:
            raise UserError("--reset-attention-mask on packs without neat-pack segment ids splits samples at "
                            "end-of-document tokens: give --tokenizer-name-or-path")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.cfg.data.tokenizer)
        if tok.eos_token_id is None:
            raise UserError(f"--tokenizer-name-or-path {self.cfg.data.tokenizer}: the tokenizer has no eos token")
        return int(tok.eos_token_id)

    # ------------------------------------------------------------------------------------------ steps

    def _batches(self, order, start: int) -> list[dict]:
        r = self.rank
        return [collate([self.dataset[i] for i in order.sample_at(pos)], self.collate_opts)
                for pos in micro_batch_positions(start, self.cfg.batch.global_batch_size,
                                                 self.cfg.batch.micro_batch_size, r.dp_size, r.dp_rank)]

    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        acc = get_accelerator()
        dev = acc.device()
        if self.rope is not None:
            self.rope.position_ids = batch["position_ids"].to(dev) if batch["attention_mask"] is not None else None
        mask = batch["attention_mask"]
        args = (batch["tokens"].to(dev), batch["position_ids"].to(dev), mask.to(dev) if mask is not None else None)
        if self.cfg.fused_cross_entropy and self.rank.is_last_stage:
            # post_process off for this forward only: GPTModel returns the final-normed hidden states instead
            # of logits (megatron's finalize_model_grads reads post_process to sync tied embeddings)
            self.model.post_process = False
            try:
                hidden = model(*args)
            finally:
                self.model.post_process = True
            out = self._fused_ce_loss(hidden, batch["labels"].to(dev))
        else:
            out = model(*args, labels=batch["labels"].to(dev))
        return out, partial(self._loss_func, batch["loss_mask"].to(dev))

    def _fused_ce_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token loss [b, s] from the final hidden states [s, b, h] without materialising the [s, b, v]
        logits."""
        from mindspeed_lora.ops.cross_entropy import fused_linear_cross_entropy

        return fused_linear_cross_entropy(hidden, self._ce_weight, labels,
                                          sequence_parallel=self.cfg.parallel.sequence_parallel)

    @staticmethod
    def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
        losses = output.float()
        loss_sum = (losses * loss_mask).sum()
        n = loss_mask.sum()
        report = torch.stack([loss_sum.detach(), n.detach()])
        return loss_sum, n.to(torch.int), {"lm loss": report}

    def _reduce_loss(self, reported: list[dict]) -> float:
        """The step's loss on every rank (computed on the last pipeline stage, shared over the pipeline)."""
        from megatron.core import parallel_state as ps

        dev = get_accelerator().device()
        value = torch.zeros(1, dtype=torch.float64, device=dev)
        if self.rank.is_last_stage:
            pairs = torch.stack([d["lm loss"].double() for d in reported])  # [micro-batches, 2]
            if self.cfg.batch.calculate_per_token_loss:
                totals = pairs.sum(0)
                dist.all_reduce(totals, group=ps.get_data_parallel_group())
                value[0] = totals[0] / totals[1].clamp(min=1)
            else:
                mean_sum = (pairs[:, 0] / pairs[:, 1].clamp(min=1)).sum().reshape(1)
                dist.all_reduce(mean_sum, group=ps.get_data_parallel_group())
                value[0] = mean_sum[0] / (len(reported) * self.rank.dp_size)
        if self.rank.pp_size > 1:
            dist.all_reduce(value, group=ps.get_pipeline_model_parallel_group())
        return float(value.item())

    def _throughput(self, batches: list[dict]) -> tuple[int, float]:
        from megatron.core import parallel_state as ps

        tokens = sum(sum(b["segment_lengths"]) for b in batches)
        flops = sum(metrics.train_flops(self.arch, b["segment_lengths"], self.lora_training) for b in batches)
        t = torch.tensor([float(tokens), flops], dtype=torch.float64)
        if self.rank.dp_size > 1:  # host numbers: megatron's gloo data-parallel group
            dist.all_reduce(t, group=ps.get_data_parallel_group_gloo())
        return int(t[0].item()), float(t[1].item())

    def _run_microbatches(self, batches: list[dict], forward_only: bool) -> list[dict]:
        length = batches[0]["tokens"].shape[1]
        return self.forward_backward(
            forward_step_func=self._forward_step, data_iterator=iter(batches), model=self.chunks,
            num_microbatches=len(batches), seq_length=length, micro_batch_size=self.cfg.batch.micro_batch_size,
            forward_only=forward_only)

    def train_step(self, batches: list[dict]) -> tuple[float, float | None, bool]:
        """One optimizer step; returns (loss, grad norm, skipped). A non-finite loss updates nothing."""
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        reported = self._run_microbatches(batches, forward_only=False)
        loss = self._reduce_loss(reported)
        if not math.isfinite(loss):
            return loss, None, True
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        return loss, (float(grad_norm) if grad_norm is not None else None), not ok

    def evaluate(self) -> float:
        """Mean loss over --eval-iters global batches of the validation split (always the same batches)."""
        gbs = self.cfg.batch.global_batch_size
        for chunk in self.chunks:
            chunk.eval()
        total = 0.0
        with torch.no_grad():
            for i in range(self.cfg.logging.eval_iters):
                total += self._reduce_loss(self._run_microbatches(self._batches(self.valid_order, i * gbs), True))
        for chunk in self.chunks:
            chunk.train()
        return total / self.cfg.logging.eval_iters

    # ------------------------------------------------------------------------------------------ saving

    def _model_state(self) -> dict:
        if self.lora is not None:
            return self.lora.adapter_state(self.model)
        return model_setup.checkpoint_weight_keys(self.model)

    def _checkpoint_metadata(self, iteration: int) -> dict:
        """What ``mindspeed_lora.json`` beside the checkpoints records."""
        return model_setup.metadata_for(self.arch, self.cfg.parallel, self.cfg.model.params_dtype,
                                        self.lora.metadata() if self.lora else None, iteration)

    def save(self, iteration: int) -> str:
        ck = self.cfg.checkpoint
        overlap = self.cfg.optim.overlap_param_gather
        if overlap:
            for chunk in self.chunks:  # completes the in-flight param all-gather: the weights are current
                chunk.disable_forward_pre_hook(param_sync=True)
        meta = self._checkpoint_metadata(iteration)
        try:
            return checkpointing.save_checkpoint(
                ck.save, iteration, model_state=self._model_state(), optimizer=self.optimizer,
                scheduler=self.scheduler, rank=self.rank, consumed_train_samples=self.consumed, args=self.cfg.args,
                metadata=meta, save_optim=ck.save_optim, save_rng=ck.save_rng, hf_source=self.source.path)
        finally:
            if overlap:
                for chunk in self.chunks:
                    chunk.enable_forward_pre_hook()

    # ------------------------------------------------------------------------------------------ loop

    def train(self) -> TrainResult:
        cfg = self.cfg
        log = cfg.logging
        result = TrainResult(iteration=self.iteration, start_iteration=self.iteration)
        gbs = cfg.batch.global_batch_size
        stats = metrics.IntervalStats()
        acc = get_accelerator()
        for chunk in self.chunks:
            chunk.train()
        profiler = self._profiler()
        ck = cfg.checkpoint
        watch = ExitWatch(ck.exit_signal, ck.exit_interval, ck.exit_duration_mins)
        with manual_gc(log.manual_gc), contextlib.closing(watch):
            while self.iteration < self.train_iters:
                t0 = time.time()
                batches = self._batches(self.train_order, self.consumed)
                lr = self._lr()
                if profiler is not None:
                    profiler.begin(self.iteration + 1)
                loss, grad_norm, skipped = self.train_step(batches)
                if profiler is not None:
                    profiler.end(self.iteration + 1)
                if not math.isfinite(loss):
                    last = result.checkpoints[-1] if result.checkpoints else None
                    where = f"the last good checkpoint is {last}" if last else "no checkpoint was written by this run"
                    raise TrainingStopped(f"iteration {self.iteration + 1}: loss is {loss} (not finite); stopping "
                                          f"without updating the weights; {where}")
                acc.synchronize()
                seconds = time.time() - t0
                self.iteration += 1
                self.consumed += gbs
                tokens, flops = self._throughput(batches)
                stats.add(seconds, tokens, flops, loss, skipped)
                result.iteration = self.iteration
                result.losses.append((self.iteration, loss))
                result.grad_norms.append((self.iteration, grad_norm))
                result.learning_rates.append((self.iteration, lr))
                if skipped:
                    result.skipped.append(self.iteration)
                if self.iteration % log.log_interval == 0 or self.iteration == self.train_iters:
                    mem = acc.memory_stats()
                    scale = float(self.optimizer.get_loss_scale()) if cfg.model.params_dtype == torch.float16 else None
                    log_rank0(metrics.format_log_line(self.iteration, self.train_iters, self.consumed, stats, lr,
                                                      grad_norm, gbs, self.rank.world_size, mem, scale))
                    self.tb.scalars(self.iteration, {
                        "lm loss": stats.loss_sum / stats.iterations, "learning-rate": lr, "grad-norm": grad_norm,
                        "skipped-iterations": stats.skipped, "tokens-per-sec": stats.tokens / max(stats.seconds, 1e-9),
                        "tflops-per-device": stats.flops / max(stats.seconds, 1e-9) / self.rank.world_size / 1e12,
                        "mem-max-allocated-GiB": mem.get("max_allocated", 0) / 1024 ** 3,
                        "iteration-time-ms": 1000 * stats.seconds / stats.iterations,
                    })
                    stats = metrics.IntervalStats()
                if log.eval_interval and log.eval_iters and self.iteration % log.eval_interval == 0:
                    self._validate(result)
                if ck.save_interval and self.iteration % ck.save_interval == 0:
                    result.checkpoints.append(self.save(self.iteration))
                if log.manual_gc and log.manual_gc_interval and self.iteration % log.manual_gc_interval == 0:
                    gc.collect()
                result.exit_reason = watch.reason(self.iteration)
                if result.exit_reason is not None:
                    log_rank0(f"exiting after iteration {self.iteration}: {result.exit_reason}"
                              + ("" if ck.save else " (no --save: nothing is saved)"))
                    break
        if result.exit_reason is None and log.eval_iters and log.eval_interval and (
                not result.valid_losses or result.valid_losses[-1][0] != self.iteration):
            self._validate(result)
        if cfg.checkpoint.save and (not result.checkpoints
                                    or not result.checkpoints[-1].endswith(f"iter_{self.iteration:07d}")):
            result.checkpoints.append(self.save(self.iteration))
        if profiler is not None:
            profiler.finish()  # the run ended inside the profiled range
            for path in profiler.written:
                print(f"profile written to {os.path.abspath(path)}", flush=True)
        result.loss_curve = self._loss_curve(result)
        return result

    def _profiler(self):
        log = self.cfg.logging
        if not log.profile:
            return None
        from mindspeed_lora.training.profiling import StepProfiler

        path = log.profile_save_path or os.path.join(log.tensorboard_dir or ".", "profile")
        return StepProfiler(log.profile_step_start, log.profile_step_end, list(log.profile_ranks), path,
                            dist.get_rank(), log.profile_record_shapes, log.profile_with_memory)

    def _lr(self) -> float:
        from megatron.core.optimizer_param_scheduler import get_canonical_lr_for_logging

        lr = get_canonical_lr_for_logging(self.optimizer.param_groups)
        return float(lr if lr is not None else self.optimizer.param_groups[0]["lr"])

    def _validate(self, result: TrainResult) -> None:
        log = self.cfg.logging
        if log.manual_gc and log.manual_gc_eval:
            gc.collect()
        loss = self.evaluate()
        if log.manual_gc and log.manual_gc_eval:
            gc.collect()
        result.valid_losses.append((self.iteration, loss))
        log_rank0(f" validation loss at iteration {self.iteration} | lm loss value: {loss:.6E} | "
                  f"lm loss PPL: {math.exp(min(loss, 50)):.6E} |")
        self.tb.scalars(self.iteration, {"lm loss validation": loss})

    def _loss_curve(self, result: TrainResult) -> str | None:
        if dist.get_rank() != 0 or not result.losses:
            return None
        default_dir = self.cfg.checkpoint.save or self.cfg.logging.tensorboard_dir or "."
        path = self.cfg.logging.loss_curve or os.path.join(default_dir, "loss_curve.png")
        metrics.write_loss_curve(path, result.losses, result.valid_losses)
        print(f"loss curve written to {os.path.abspath(path)}", flush=True)
        return path

    def cleanup(self) -> None:
        self.tb.close()


def run(cfg: TrainingConfig) -> TrainResult:
    trainer = SFTTrainer(cfg)
    trainer.setup()
    try:
        return trainer.train()
    finally:
        trainer.cleanup()
