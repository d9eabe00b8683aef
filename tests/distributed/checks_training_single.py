"""Single-rank training runs (a world of one, launched before the 2-rank checks; see test_training.py).

They record the references the 2-rank checks compare with, and check what needs no second rank: the loss
falls, packed samples equal the same samples unpacked, and padding to a multiple of 8 equals padding to
--seq-length.
"""
from __future__ import annotations

import torch

from tests import training_fixtures as fx
from tests.distributed.checks_training import base_argv, inputs, lora_argv, root_of, save_ref, train


def check_reference_full_qwen3(tmp):
    root = root_of(tmp)
    _, result = train(base_argv(inputs(root), "qwen3"))
    save_ref(root, "full_qwen3", result)


def check_reference_full_qwen2(tmp):
    root = root_of(tmp)
    _, result = train(base_argv(inputs(root), "qwen2"))
    save_ref(root, "full_qwen2", result)


def check_reference_lora_qwen3(tmp):
    root = root_of(tmp)
    _, result = train(lora_argv(inputs(root)))
    save_ref(root, "lora_qwen3", result)


def check_lora_loss_falls(tmp):
    p = inputs(root_of(tmp))
    trainer, result = train(fx.train_argv(p["qwen3"], p["toy"], iters=24, gbs=8, mbs=4, seq=32, lr=5e-2,
                                          extra=["--lora-target-modules", "all-linear", "--lora-r", "8"]))
    # the frozen random output layer (std 0.02) caps how far adapters can move the logits: ~0.25 nats here
    losses = [v for _, v in result.losses]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.15, losses
    assert trainer.lora is not None


def _falls(losses: list[float], factor: float) -> None:
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < factor * first, f"loss did not fall: first {losses[:3]}, last {losses[-3:]}"


def check_full_finetuning_loss_falls(tmp):
    p = inputs(root_of(tmp))
    _, result = train(fx.train_argv(p["qwen3"], p["toy"], iters=24, gbs=8, mbs=4, seq=32, lr=3e-3))
    _falls([v for _, v in result.losses], 0.7)


def check_variable_lengths_equal_padding_to_seq_length(tmp):
    p = inputs(root_of(tmp))
    _, padded = train(base_argv(p, iters=3))
    _, variable = train(base_argv(p, extra=["--variable-seq-lengths"], iters=3))
    for (_, a), (_, b) in zip(padded.losses, variable.losses):
        assert abs(a - b) <= 1e-6 * abs(a), (padded.losses, variable.losses)


def check_packed_samples_equal_unpacked(tmp):
    """One neat-packed row gives each sample the loss it has alone: no attention across, positions restart."""
    from mindspeed_lora.data.sft_dataset import CollateOptions, SFTIndexedDataset, collate

    p = inputs(root_of(tmp))
    trainer, _ = train(fx.train_argv(p["qwen3"], p["packed"], iters=1, gbs=1, seq=32, lr=0.0,
                                     extra=["--neat-pack"]))
    model, rope = trainer.model, trainer.rope
    model.eval()
    packs = SFTIndexedDataset(p["packed"])
    pack = packs[0]
    n_segments = int(pack["attention_mask"].max())
    assert n_segments >= 2
    singles = [{k: v[pack["attention_mask"] == s] for k, v in pack.items()} for s in range(1, n_segments + 1)]
    for s in singles:
        s["attention_mask"] = s["attention_mask"] * 0 + 1

    def token_losses(batch):
        rope.position_ids = batch["position_ids"] if batch["attention_mask"] is not None else None
        with torch.no_grad():
            out = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
        return out * batch["loss_mask"], batch["loss_mask"]

    packed = collate([pack], CollateOptions(seq_length=32, segments="ids"))
    assert packed["attention_mask"] is not None
    packed_losses, packed_mask = token_losses(packed)
    got = []
    start = 0
    for s in singles:
        n = len(s["input_ids"])
        got.append(packed_losses[0, start:start + n])
        assert packed_mask[0, start + n - 1] == 0  # the last token does not predict the next sample
        start += n
    for s, g in zip(singles, got):
        alone, _ = token_losses(collate([s], CollateOptions(seq_length=32)))
        want = alone[0, :len(s["input_ids"])]
        assert torch.allclose(g, want, rtol=1e-5, atol=1e-6), (g, want)
    # and the trainer itself: without --neat-pack the same row attends across samples and differs
    cross = collate([pack], CollateOptions(seq_length=32))
    cross_losses, _ = token_losses(cross)
    assert not torch.allclose(cross_losses, packed_losses, rtol=1e-4)


def check_bf16_trains_with_fp32_main_params(tmp):
    """bf16 weights, fp32 optimizer copies (megatron's Float16 optimizer, and the distributed one)."""
    p = inputs(root_of(tmp))
    for extra in ([], ["--use-distributed-optimizer"]):
        trainer, result = train(fx.train_argv(p["qwen3"], p["toy"], iters=12, gbs=8, mbs=4, seq=32, lr=3e-3,
                                              extra=["--bf16", *extra]))
        assert next(trainer.model.parameters()).dtype == torch.bfloat16
        _falls([v for _, v in result.losses], 0.85)


def check_train_epochs_set_the_iterations(tmp):
    p = inputs(root_of(tmp))  # 48 training samples
    trainer, result = train(fx.train_argv(p["qwen3"], p["toy"], iters=None, gbs=16, mbs=8, seq=32,
                                          extra=["--train-epochs", "0.7"]))
    assert trainer.train_iters == 2 and len(result.losses) == 2  # int(0.7 * 48) // 16


def check_fp16_overflow_skips_the_update_and_lowers_the_loss_scale(tmp):
    p = inputs(root_of(tmp))
    argv = fx.train_argv(p["qwen3"], p["toy"], iters=3, gbs=8, mbs=4, seq=32, lr=3e-3, extra=["--fp16"])
    trainer, result = train(argv)  # the default initial scale 2^32 overflows fp16 grads
    assert result.skipped == [1, 2, 3] and all(g is None for _, g in result.grad_norms)
    # megatron's dynamic scaler: hysteresis 2, then halves at every overflow
    assert float(trainer.optimizer.get_loss_scale()) == 2.0 ** 30
    assert trainer.scheduler.num_steps == 0  # skipped steps do not advance the schedule
    trainer, result = train(argv + ["--initial-loss-scale", "4096"])
    assert result.skipped == [] and trainer.scheduler.num_steps == 3


def check_profile_writes_trace_and_table_and_changes_nothing(tmp):
    import json
    import os

    p = inputs(root_of(tmp))
    out = os.path.join(tmp, "prof")
    _, plain = train(base_argv(p, iters=4))
    _, profiled = train(base_argv(p, iters=4, extra=["--profile", "--profile-step-start", "2",
                                                     "--profile-step-end", "4", "--profile-save-path", out]))
    assert profiled.losses == plain.losses
    assert sorted(os.listdir(out)) == ["ops_rank0.txt", "trace_rank0.json"]
    with open(os.path.join(out, "trace_rank0.json")) as f:
        events = json.load(f)["traceEvents"]
    # the profiled iterations ran megatron's forward-backward: its matmuls are in the trace and the table
    assert any(e.get("name") in ("aten::mm", "aten::addmm", "aten::matmul", "aten::linear") for e in events)
    with open(os.path.join(out, "ops_rank0.txt")) as f:
        table = f.read()
    assert table.startswith("iterations 2..3, rank 0") and "aten::" in table


def check_manual_gc_collects_only_at_its_interval_and_changes_nothing(tmp):
    import gc

    p = inputs(root_of(tmp))
    _, plain = train(base_argv(p, iters=5))
    collections = []  # (generation, collector enabled) of every collection that starts

    def seen(phase, info):
        if phase == "start":
            collections.append((info["generation"], gc.isenabled()))

    gc.callbacks.append(seen)
    try:
        _, manual = train(base_argv(p, iters=5, extra=["--manual-gc", "--manual-gc-interval", "2"]))
    finally:
        gc.callbacks.remove(seen)
    assert manual.losses == plain.losses
    # while the collector is off, the only collections are the full ones after iterations 2 and 4
    assert [c for c in collections if not c[1]] == [(2, False), (2, False)], collections
    assert gc.isenabled() and gc.get_freeze_count() == 0  # the run gave the collector back
