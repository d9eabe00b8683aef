"""posttrain_gpt.py --stage dpo on 2 gloo ranks (one launch; see test_dpo.py).

Oracles: HF transformers + peft log-probs fed to the DPO formulas written out here (not ``dpo.loss``), and the
same DPO run at TP=1 (2 data-parallel ranks) for the TP=2 / TP=2+SP / PP=2 layouts.
"""
from __future__ import annotations

import json
import math
import os
import tempfile

import torch
import torch.distributed as dist

from mindspeed_lora.errors import UserError
from tests import dpo_fixtures as dfx
from tests import lora_fixtures as lfx
from tests import training_fixtures as fx

LORA = ["--lora-target-modules", "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2",
        "--lora-r", str(lfx.R), "--lora-alpha", str(lfx.ALPHA)]


def inputs(tmp: str) -> dict:
    base = os.path.join(os.path.dirname(os.path.abspath(tmp)), "inputs")
    paths = {"model": os.path.join(base, "hf_qwen3"), "data": os.path.join(base, "data", "pref")}
    done = os.path.join(base, "done")
    if dist.get_rank() == 0 and not os.path.exists(done):
        fx.tiny_model_dir(base, "qwen3")
        dfx.write_pairwise_data(paths["data"], dfx.preference_pairs(64, seed=0))
        open(done, "w").close()
    dist.barrier()
    return paths


def trainer_for(argv: list[str]):
    from mindspeed_lora.arguments import parse_args
    from mindspeed_lora.dpo.trainer import DPOTrainer, config_from_args

    argv = [*argv, "--loss-curve", os.path.join(tempfile.mkdtemp(prefix="curve"), "c.png")]
    trainer = DPOTrainer.of(config_from_args(parse_args("posttrain_gpt", argv)))
    trainer.setup()
    return trainer


def train(argv: list[str]):
    trainer = trainer_for(argv)
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    return trainer.history


# --------------------------------------------------------------------------------------------- oracle

def _hf_logps(model, sample: dict, side: str) -> tuple[float, int]:
    """Sum of log p(response token) and the response length, from the HF model's logits."""
    ids = torch.as_tensor(sample[side]["input_ids"]).long()
    labels = torch.as_tensor(sample[side]["labels"]).long()
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), -1)
    targets = [t for t in range(1, len(ids)) if labels[t] != -100]
    return sum(logp[t - 1, ids[t]].item() for t in targets), len(targets)


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _oracle(kind: str, beta: float, eps: float, ftx: float, pol: list, ref: list, gamma: float = 0.0) -> dict:
    """pol / ref: per pair (chosen logp, chosen len, rejected logp, rejected len)."""
    losses, rc, rr = [], [], []
    for (pc, lc, pr, lr), (qc, _, qr, _) in zip(pol, ref):
        if kind in ("simpo", "orpo"):  # reference-free, on mean log-probs
            c, r = pc / lc, pr / lr
            if kind == "simpo":
                loss = -_log_sigmoid(beta * (c - r) - gamma)
            else:
                loss = -c - beta * _log_sigmoid((c - math.log(1 - math.exp(c))) - (r - math.log(1 - math.exp(r))))
            losses.append(loss - ftx * c)
            rc.append(beta * c)
            rr.append(beta * r)
            continue
        if kind == "ipo":
            h = (pc / lc - pr / lr) - (qc / lc - qr / lr)
            loss = (h - 1 / (2 * beta)) ** 2
        else:
            h = (pc - pr) - (qc - qr)
            loss = (-(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h) if kind == "sigmoid"
                    else max(0.0, 1 - beta * h))
        losses.append(loss - ftx * pc / lc)
        rc.append(beta * (pc - qc))
        rr.append(beta * (pr - qr))
    n = len(pol)
    return {"loss": sum(losses) / n, "rewards/chosen": sum(rc) / n, "rewards/rejected": sum(rr) / n,
            "rewards/accuracy": sum(c > r for c, r in zip(rc, rr)) / n,
            "rewards/margin": sum(c - r for c, r in zip(rc, rr)) / n,
            "logps/chosen": sum(p[0] for p in pol) / n, "logps/rejected": sum(p[2] for p in pol) / n}


def check_loss_and_rewards_equal_hf_peft_oracle_tp2(tmp):
    """TP=2, LoRA with peft's random nonzero adapters: policy = peft model, reference = its base (peft's
    disable_adapter, independent of our toggle); every loss type within 1e-5."""
    from mindspeed_lora.dpo.loss import DPOConfig

    p = inputs(tmp)
    trainer = trainer_for(dfx.dpo_argv(p["model"], p["data"], gbs=4, mbs=2, extra=[
        "--tensor-model-parallel-size", "2", *LORA]))
    peft = lfx.peft_model(p["model"], seed=3).eval()
    lfx.load_adapters(trainer.model, lfx.peft_full(peft, trainer.arch), 0, 2, trainer.rank.tp_rank)
    samples = [trainer.dataset[i] for i in trainer.train_order.sample_at(list(range(4)))]
    pol, ref = [], []
    for s in samples:
        pol.append(_hf_logps(peft, s, "chosen") + _hf_logps(peft, s, "rejected"))
        with peft.disable_adapter():
            ref.append(_hf_logps(peft, s, "chosen") + _hf_logps(peft, s, "rejected"))
    assert any(abs(a[0] - b[0]) > 1e-2 for a, b in zip(pol, ref)), "adapters must change the log-probs"
    for kind, beta, eps, ftx in (("sigmoid", 0.1, 0.0, 0.0), ("sigmoid", 0.5, 0.2, 0.3), ("ipo", 0.3, 0.0, 0.0),
                                 ("hinge", 0.1, 0.0, 0.0), ("simpo", 2.0, 0.0, 0.2), ("orpo", 0.2, 0.0, 0.0)):
        trainer.dpo = DPOConfig(beta=beta, loss_type=kind, label_smoothing=eps, pref_ftx=ftx, simpo_gamma=0.7)
        for c in trainer.chunks:
            c.eval()
        with torch.no_grad():
            loss = trainer._reduce_loss(trainer._run_microbatches(trainer._batches(trainer.train_order, 0), True))
        want = _oracle(kind, beta, eps, ftx, pol, ref, gamma=0.7)
        got = dict(trainer.last_metrics)
        assert abs(loss - want["loss"]) <= 1e-5 * max(1.0, abs(want["loss"])), (kind, loss, want["loss"])
        for k, v in want.items():
            assert abs(got[k] - v) <= 1e-5 * max(1.0, abs(v)), f"{kind} {k}: ours {got[k]!r} vs oracle {v!r}"
    trainer.cleanup()


# --------------------------------------------------------------------------------------------- layouts

def _assert_same_history(got, want, what):
    """Within 1e-5 relative to the step's largest reward or the value (a margin is a difference of rewards)."""
    assert len(got) == len(want) == 3, (what, got, want)
    for (i, g), (_, w) in zip(got, want):
        scale = max(1.0, abs(w["rewards/chosen"]), abs(w["rewards/rejected"]))
        for k, v in w.items():
            assert abs(g[k] - v) <= 1e-5 * max(scale, abs(v)), f"{what} iteration {i} {k}: {g[k]!r} vs TP=1 {v!r}"


def check_tp2_sp_and_pp2_train_like_tp1(tmp):
    """Three DPO steps (full fine-tuning and LoRA): TP=2, TP=2+SP, PP=2 give TP=1's losses and metrics."""
    p = inputs(tmp)

    def argv(extra):
        return dfx.dpo_argv(p["model"], p["data"], iters=3, gbs=4, mbs=1, lr=1e-2, extra=["--dpo-beta", "0.5",
                                                                                          *extra])

    full_tp1 = train(argv([]))
    assert full_tp1[-1][1]["loss"] != full_tp1[0][1]["loss"], "the policy must move away from the reference"
    _assert_same_history(train(argv(["--tensor-model-parallel-size", "2"])), full_tp1, "full FT TP=2")
    lora_tp1 = train(argv(LORA))
    _assert_same_history(train(argv(["--tensor-model-parallel-size", "2", "--sequence-parallel", *LORA])),
                         lora_tp1, "LoRA TP=2 SP")
    _assert_same_history(train(argv(["--pipeline-model-parallel-size", "2", *LORA])), lora_tp1, "LoRA PP=2")


def check_reference_free_losses_build_and_run_no_reference(tmp):
    """Full fine-tuning with simpo / orpo: no reference model is built and no reference pass runs (the batches
    never get reference log-probs); three steps at TP=2 give TP=1's metrics; --ref-load is refused."""
    p = inputs(tmp)
    for kind in ("simpo", "orpo"):
        def argv(extra):
            return dfx.dpo_argv(p["model"], p["data"], iters=3, gbs=4, mbs=1, lr=1e-2,
                                extra=["--dpo-loss-type", kind, "--dpo-beta", "2.0", *extra])

        trainer = trainer_for(argv([]))
        try:
            assert trainer.reference is None and trainer.reference_source is None
            batches = trainer._batches(trainer.train_order, 0)
            trainer._run_microbatches(batches, forward_only=True)
            assert not any("reference_logps" in b for b in batches)
            trainer.train()
        finally:
            trainer.cleanup()
        tp1 = trainer.history
        assert tp1[-1][1]["loss"] != tp1[0][1]["loss"]
        _assert_same_history(train(argv(["--tensor-model-parallel-size", "2"])), tp1, f"{kind} TP=2")
    try:
        train(argv(["--ref-load", p["model"]]))
    except UserError as e:
        assert "uses no reference model" in str(e), str(e)
    else:
        raise AssertionError("--ref-load with a reference-free loss was accepted")


def check_training_learns_the_preference(tmp):
    """Chosen responses follow one pattern, rejected another: accuracy ends above 0.9 and the margin grows."""
    p = inputs(tmp)
    history = train(dfx.dpo_argv(p["model"], p["data"], iters=16, gbs=8, mbs=2, lr=1e-2, extra=[
        "--dpo-beta", "0.5", "--tensor-model-parallel-size", "2"]))
    acc = [m["rewards/accuracy"] for _, m in history]
    margin = [m["rewards/margin"] for _, m in history]
    assert min(acc[-3:]) > 0.9, acc
    assert sum(margin[-3:]) / 3 > 1.0 > margin[1], margin


# --------------------------------------------------------------------------------------------- resume

def _expect_user_error(argv: list[str], *fragments: str) -> None:
    from mindspeed_lora.errors import UserError

    try:
        train(argv)
    except UserError as e:
        for frag in fragments:
            assert frag in str(e), f"message {str(e)!r} lacks {frag!r}"
        return
    raise AssertionError(f"no UserError for {argv}")


def _edit_metadata(save: str, **changes) -> None:
    if dist.get_rank() == 0:
        path = os.path.join(save, "mindspeed_lora.json")
        meta = json.load(open(path))
        meta.update(changes)
        meta = {k: v for k, v in meta.items() if v is not None}
        json.dump(meta, open(path, "w"))
    dist.barrier()


def check_full_dpo_resumes_exactly_against_its_reference(tmp):
    """Full-parameter DPO saved at steps 2 and 4 and resumed with --ckpt-step 2: steps 3-4 give the
    uninterrupted run's metrics bit for bit, so the reference is the recorded start model and not the trained
    weights --load now holds (that would change every reward). The same with --ref-load given; refusals for an
    iteration not saved, a checkpoint recording no reference, a recorded reference that is gone, another
    model, and LoRA."""
    p = inputs(tmp)
    save = os.path.join(tmp, "dpo_full")

    def argv(load, extra=()):
        return dfx.dpo_argv(load, p["data"], iters=4, gbs=4, mbs=1, lr=1e-2, extra=["--dpo-beta", "0.5", *extra])

    full = train(argv(p["model"], ["--save", save, "--save-interval", "2"]))
    meta = json.load(open(os.path.join(save, "mindspeed_lora.json")))
    assert meta["dpo_reference"] == os.path.abspath(p["model"]), meta.get("dpo_reference")
    assert meta["dpo_reference_iteration"] is None  # an HF dir has no iterations
    want = [(i, m) for i, m in full if i > 2]
    assert want[0][1]["rewards/margin"] != 0.0, "the policy must have moved from the reference by step 3"
    resumed = train(argv(save, ["--ckpt-step", "2"]))
    assert resumed == want, f"resumed {resumed} vs uninterrupted {want}"
    assert train(argv(save, ["--ckpt-step", "2", "--ref-load", p["model"]])) == want

    _expect_user_error(argv(save, ["--ckpt-step", "3"]), f"--ckpt-step 3: --load {save}: no iteration 3",
                       "saved iterations: 2, 4")
    _edit_metadata(save, dpo_reference=None)  # as an SFT checkpoint has it
    _expect_user_error(argv(save), "records no DPO reference model", "--finetune", "--ref-load")
    _edit_metadata(save, dpo_reference=os.path.join(tmp, "moved_away"))
    _expect_user_error(argv(save), "moved_away) is not there any more", "--ref-load")
    other = os.path.join(os.path.dirname(p["model"]), "hf_qwen2")
    if dist.get_rank() == 0:
        fx.tiny_model_dir(os.path.dirname(p["model"]), "qwen2")
    dist.barrier()
    _expect_user_error(argv(save, ["--ref-load", other]), f"--ref-load {other}: a different model")
    _expect_user_error(argv(p["model"], ["--ref-load", p["model"], *LORA]), "with LoRA the reference is")


def check_refer_model_iter_reads_the_reference_iteration(tmp):
    """MindSpeed-LLM's workflow: full DPO from a converted checkpoint (iteration 1) that saves into the same
    directory (iterations 2 and 4 with trained weights). The run records its reference as iteration 1 of that
    directory, so a resume from --ckpt-step 2 gives steps 3-4 bit for bit on its own, with --refer-model-iter 1,
    and with --ref-load DIR --refer-model-iter 1 (without the flag --ref-load DIR means its latest, iteration 4);
    --refer-model-iter 2 (trained weights as reference) changes the rewards. An older version's record (no
    iteration) of the directory it saved into is refused unless --refer-model-iter says which. --finetune
    --ckpt-step 1 starts from the converted weights with them as reference: the first run again, bit for bit."""
    p = inputs(tmp)
    run = os.path.join(tmp, "run")
    if dist.get_rank() == 0:
        from mindspeed_lora.arguments import parse_args
        from mindspeed_lora.checkpoint.convert import run_from_args

        assert run_from_args(parse_args("convert_ckpt", ["--use-mcore-models", "--no-progress", "--load-model-type",
                                                         "hf", "--save-model-type", "mg", "--load-dir", p["model"],
                                                         "--save-dir", run])) == 0
    dist.barrier()

    def argv(extra, iters=4):
        return dfx.dpo_argv(run, p["data"], iters=iters, gbs=4, mbs=1, lr=1e-2, extra=["--dpo-beta", "0.5", *extra])

    full = train(argv(["--save", run, "--save-interval", "2"]))
    meta = json.load(open(os.path.join(run, "mindspeed_lora.json")))
    assert (meta["dpo_reference"], meta["dpo_reference_iteration"]) == (os.path.abspath(run), 1), meta
    want = [(i, m) for i, m in full if i > 2]
    assert train(argv(["--ckpt-step", "2"])) == want
    assert train(argv(["--ckpt-step", "2", "--refer-model-iter", "1"])) == want
    assert train(argv(["--ckpt-step", "2", "--ref-load", run, "--refer-model-iter", "1"])) == want
    (_, trained_ref), = train(argv(["--ckpt-step", "2", "--refer-model-iter", "2"], iters=3))
    # the same policy at step 3, and iteration 2 as its reference is that policy itself: rewards 0
    assert trained_ref["logps/chosen"] == want[0][1]["logps/chosen"]
    assert abs(trained_ref["rewards/chosen"]) < 1e-6 < abs(want[0][1]["rewards/chosen"]), (trained_ref, want[0])

    _edit_metadata(run, dpo_reference_iteration=None)  # an older version's record: the directory only
    _expect_user_error(argv(["--ckpt-step", "2"]), "without an iteration", "--refer-model-iter N")
    assert train(argv(["--ckpt-step", "2", "--refer-model-iter", "1"])) == want

    assert train(argv(["--finetune", "--ckpt-step", "1"])) == full
    latest = train(argv(["--finetune"], iters=1))  # iteration 4: trained weights as policy and reference
    assert latest[0][1]["logps/chosen"] != full[0][1]["logps/chosen"]


def check_lora_dpo_resumes_exactly(tmp):
    """LoRA DPO saved at step 2 of 4, resumed with --lora-load: steps 3-4 equal the uninterrupted run's."""
    from tests.distributed.checks_training import barrier_write_latest

    p = inputs(tmp)
    save = os.path.join(tmp, "dpo_lora")

    def argv(extra):
        return dfx.dpo_argv(p["model"], p["data"], iters=4, gbs=4, mbs=1, lr=1e-2,
                            extra=["--dpo-beta", "0.5", *LORA, *extra])

    full = train(argv(["--save", save, "--save-interval", "2"]))
    barrier_write_latest(save, 2)
    want = [(i, m) for i, m in full if i > 2]
    assert want[0][1]["rewards/margin"] != 0.0, "the adapters must have moved the policy by step 3"
    assert train(argv(["--lora-load", save])) == want
