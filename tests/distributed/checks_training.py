"""posttrain_gpt.py training on 2 gloo ranks, checked against single-rank runs (see test_training.py).

Oracle: the same training run on one rank. ``checks_training_single.py`` runs the references in a world of
one (its own torchrun launch, before this one) and writes their per-iteration losses and grad norms to
``<root>/single/refs/*.json``; every check here reruns that configuration with TP=2, TP=2+SP, PP=2, DP=2 or
the distributed optimizer and compares, iteration by iteration, within 1e-5 relative. Resume is compared
bitwise with the uninterrupted run of the same layout.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch
import torch.distributed as dist

from tests import training_fixtures as fx

REL_TOL = 1e-5
ITERS = 5


# --------------------------------------------------------------------------------------------- shared

def root_of(tmp: str) -> str:
    """The directory shared by the single-rank and the 2-rank launch (tmp is <root>/<launch>/<check>)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(tmp)))


def inputs(root: str) -> dict:
    """Tiny models and datasets, created once by global rank 0 of whichever launch comes first."""
    base = os.path.join(root, "inputs")
    paths = {
        "qwen3": os.path.join(base, "hf_qwen3"),
        "qwen2": os.path.join(base, "hf_qwen2"),
        "heads3": os.path.join(base, "hf_heads3"),
        "toy": os.path.join(base, "data", "toy"),
        "packed": os.path.join(base, "data", "packed"),
        "long": os.path.join(base, "data", "long"),
    }
    done = os.path.join(base, "done")
    if dist.get_rank() == 0 and not os.path.exists(done):
        from mindspeed_lora import tiny

        fx.tiny_model_dir(base, "qwen3")
        fx.tiny_model_dir(base, "qwen2")
        tiny.build_hf_model("qwen3", paths["heads3"], seed=3, num_attention_heads=3, num_key_value_heads=1)
        samples = fx.toy_samples(48, seed=0)
        fx.write_sft_data(paths["toy"], samples)
        fx.write_sft_data(paths["packed"], fx.neat_pack(samples[:12], 32))
        fx.write_sft_data(paths["long"], fx.toy_samples(4, seed=1, min_prompt=40, max_prompt=40))
        open(done, "w").close()
    dist.barrier()
    return paths


def train(argv: list[str], prepare=None):
    """One run through the library entry points posttrain_gpt.py uses (process group kept alive);
    ``prepare(trainer)`` runs between setup and training."""
    from mindspeed_lora.arguments import parse_args
    from mindspeed_lora.training.config import training_config_from_args
    from mindspeed_lora.training.sft import SFTTrainer

    if "--save" not in argv and "--loss-curve" not in argv:  # keep the PNG out of the working directory
        argv = [*argv, "--loss-curve", os.path.join(tempfile.mkdtemp(prefix="curve"), "loss_curve.png")]
    trainer = SFTTrainer(training_config_from_args(parse_args("posttrain_gpt", argv)))
    trainer.setup()
    if prepare is not None:
        prepare(trainer)
    try:
        result = trainer.train()
    finally:
        trainer.cleanup()
    return trainer, result


def base_argv(p: dict, model: str = "qwen3", extra: list[str] | None = None, iters: int = ITERS) -> list[str]:
    return fx.train_argv(p[model], p["toy"], iters=iters, gbs=4, mbs=1, seq=32, lr=2e-3, extra=extra)


def ref_path(root: str, name: str) -> str:
    return os.path.join(root, "single", "refs", f"{name}.json")


def save_ref(root: str, name: str, result) -> None:
    if dist.get_rank() == 0:
        path = ref_path(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"losses": result.losses, "grad_norms": result.grad_norms}, f)


def load_ref(root: str, name: str) -> dict:
    with open(ref_path(root, name)) as f:
        return json.load(f)


def assert_close_to_ref(result, ref: dict, what: str, tol: float = REL_TOL) -> None:
    got = [v for _, v in result.losses]
    want = [v for _, v in ref["losses"]]
    assert len(got) == len(want) == ITERS, (what, got, want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert abs(g - w) <= tol * abs(w), f"{what}: iteration {i + 1} loss {g!r} vs single-rank {w!r}"
    for (_, g), (_, w) in zip(result.grad_norms, ref["grad_norms"]):
        assert abs(g - w) <= 10 * tol * abs(w), f"{what}: grad norm {g!r} vs single-rank {w!r}"


def expect_user_error(argv: list[str], *fragments: str) -> str:
    from mindspeed_lora.errors import UserError

    try:
        train(argv)
    except UserError as e:
        msg = str(e)
        for frag in fragments:
            assert frag in msg, f"message {msg!r} lacks {frag!r}"
        return msg
    raise AssertionError(f"no UserError for {argv}")


def barrier_write_latest(save_dir: str, iteration: int) -> None:
    """Point latest_checkpointed_iteration.txt at an earlier iteration (to resume from the middle)."""
    if dist.get_rank() == 0:
        with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(iteration))
    dist.barrier()


# --------------------------------------------------------------------------------------------- parity

def _parity(tmp: str, extra: list[str], ref: str = "full_qwen3", model: str = "qwen3") -> None:
    root = root_of(tmp)
    p = inputs(root)
    _, result = train(base_argv(p, model, extra))
    assert_close_to_ref(result, load_ref(root, ref), " ".join(extra))


def check_tp2_matches_single_rank(tmp):
    _parity(tmp, ["--tensor-model-parallel-size", "2"])


def check_tp2_sequence_parallel_matches_single_rank(tmp):
    _parity(tmp, ["--tensor-model-parallel-size", "2", "--sequence-parallel"])


def check_pp2_matches_single_rank(tmp):
    # variable lengths: micro-batch shapes travel between the stages
    _parity(tmp, ["--pipeline-model-parallel-size", "2", "--variable-seq-lengths"])


def check_pp2_tied_embeddings_match_single_rank(tmp):
    # qwen2 ties the output layer to the embedding: megatron keeps a copy on each end stage and syncs grads
    _parity(tmp, ["--pipeline-model-parallel-size", "2"], ref="full_qwen2", model="qwen2")


def check_dp2_matches_single_rank(tmp):
    _parity(tmp, [])


def check_distributed_optimizer_matches_single_rank(tmp):
    _parity(tmp, ["--use-distributed-optimizer"])


def check_full_recompute_pp2_matches_single_rank(tmp):
    _parity(tmp, ["--pipeline-model-parallel-size", "2", "--recompute-granularity", "full",
                  "--recompute-method", "uniform", "--recompute-num-layers", "1"])


def check_selective_recompute_tp2_matches_single_rank(tmp):
    _parity(tmp, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--recompute-activations"])


# --------------------------------------------------------------------------------------------- resume

def _resume_bitwise(tmp: str, extra: list[str]) -> None:
    """Saved at iterations 3 and 6, resumed from 3 with --ckpt-step: iterations 4-6 equal the first run's."""
    p = inputs(root_of(tmp))
    save = os.path.join(tmp, "ckpt")
    _, full = train(base_argv(p, extra=extra + ["--save", save, "--save-interval", "3"], iters=6))
    assert os.path.isdir(os.path.join(save, "iter_0000003")) and os.path.isdir(os.path.join(save, "iter_0000006"))
    argv = fx.train_argv(save, p["toy"], iters=6, gbs=4, mbs=1, seq=32, lr=2e-3, extra=extra + ["--ckpt-step", "3"])
    trainer, resumed = train(argv)
    assert resumed.start_iteration == 3, resumed.start_iteration
    assert [i for i, _ in resumed.losses] == [4, 5, 6]
    want = [v for i, v in full.losses if i > 3]
    got = [v for _, v in resumed.losses]
    assert got == want, f"resumed {got} vs uninterrupted {want}"
    assert [g for _, g in resumed.grad_norms] == [g for i, g in full.grad_norms if i > 3]


def check_planned_exits_save_and_resume_exactly(tmp):
    """--exit-interval 2, and --exit-signal-handler with SIGTERM reaching rank 1 only during iteration 3: both
    ranks stop after the same iteration, that iteration is saved, and resuming from it gives the uninterrupted
    run's losses bit for bit; --exit-duration-in-mins stops after the first iteration; the SIGTERM handler is
    the previous one again after training."""
    import signal

    p = inputs(root_of(tmp))
    _, full = train(base_argv(p, iters=6))
    before = signal.getsignal(signal.SIGTERM)

    def sigterm_rank1_in_iteration_3(trainer):
        step = trainer.train_step

        def train_step(batches):
            out = step(batches)
            if trainer.iteration == 2 and dist.get_rank() == 1:  # iteration 3 is the one in flight
                os.kill(os.getpid(), signal.SIGTERM)
            return out
        trainer.train_step = train_step

    for extra, prepare, stop, reason in ((["--exit-interval", "2"], None, 2, "--exit-interval 2"),
                                         (["--exit-signal-handler"], sigterm_rank1_in_iteration_3, 3,
                                          "SIGTERM received")):
        save = os.path.join(tmp, f"exit{stop}")
        _, result = train(base_argv(p, iters=6, extra=["--save", save, *extra]), prepare)
        assert (result.iteration, result.exit_reason) == (stop, reason), (result.iteration, result.exit_reason)
        assert signal.getsignal(signal.SIGTERM) is before
        assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read().strip() == str(stop)
        _, resumed = train(fx.train_argv(save, p["toy"], iters=6, gbs=4, mbs=1, seq=32, lr=2e-3))
        assert resumed.losses == [(i, v) for i, v in full.losses if i > stop], (resumed.losses, full.losses)
    _, result = train(base_argv(p, iters=6, extra=["--exit-duration-in-mins", "1e-9"]))
    assert (result.iteration, result.exit_reason) == (1, "--exit-duration-in-mins 1e-09 reached")


def check_deterministic_mode_turns_on_before_training(tmp):
    """--npu-deterministic (MindSpeed-LLM's name of --deterministic-mode): torch's deterministic kernels are on
    during the run, and the run trains as it does without the flag."""
    p = inputs(root_of(tmp))
    seen = []
    try:
        _, on = train(base_argv(p, iters=2, extra=["--npu-deterministic"]),
                      lambda trainer: seen.append(torch.are_deterministic_algorithms_enabled()))
    finally:
        torch.use_deterministic_algorithms(False)
    _, off = train(base_argv(p, iters=2))
    assert seen == [True] and on.losses == off.losses, (seen, on.losses, off.losses)


def check_resume_is_bitwise_with_distributed_optimizer(tmp):
    _resume_bitwise(tmp, ["--use-distributed-optimizer"])


def check_resume_is_bitwise_with_overlapped_grad_reduce_and_param_gather(tmp):
    _resume_bitwise(tmp, ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"])


def check_resume_is_bitwise_pp2(tmp):
    _resume_bitwise(tmp, ["--pipeline-model-parallel-size", "2"])


def check_finetune_starts_at_iteration_zero(tmp):
    """--finetune: the latest weights at iteration 0 with a fresh schedule; with --ckpt-step 2 those of iteration
    2 (as when the latest pointer names 2)."""
    p = inputs(root_of(tmp))
    save = os.path.join(tmp, "ckpt")
    _, first = train(base_argv(p, extra=["--save", save, "--save-interval", "2"], iters=3))

    def finetune(extra=(), iters=4):
        return train(fx.train_argv(save, p["toy"], iters=iters, gbs=4, mbs=1, seq=32, lr=2e-3,
                                   extra=["--finetune", *extra]))

    trainer, tuned = finetune()
    assert tuned.start_iteration == 0 and [i for i, _ in tuned.losses] == [1, 2, 3, 4]
    # the trained weights were loaded (the first batch is the same samples as the first run's iteration 1)
    assert tuned.losses[0][1] < first.losses[0][1] - 1e-3, (tuned.losses, first.losses)
    assert trainer.scheduler.num_steps == 4  # a fresh schedule, not the checkpoint's
    _, step2 = finetune(["--ckpt-step", "2"], iters=1)
    barrier_write_latest(save, 2)
    assert step2.losses == finetune(iters=1)[1].losses != tuned.losses[:1], (step2.losses, tuned.losses)


# --------------------------------------------------------------------------------------------- failures

def check_nan_loss_stops_and_keeps_last_good_checkpoint(tmp):
    from mindspeed_lora.training.sft import TrainingStopped

    p = inputs(root_of(tmp))
    save = os.path.join(tmp, "ckpt")
    argv = fx.train_argv(p["qwen3"], p["toy"], iters=6, gbs=4, mbs=1, seq=32, lr=1e30,
                         extra=["--save", save, "--save-interval", "1", "--lr-decay-style", "constant"])
    try:
        train(argv)
    except TrainingStopped as e:
        msg = str(e)
    else:
        raise AssertionError("a run with lr 1e30 did not stop")
    assert "not finite" in msg, msg
    latest = int(open(os.path.join(save, "latest_checkpointed_iteration.txt")).read())
    assert f"iter_{latest:07d}" in msg, msg
    failed = int(msg.split("iteration ")[1].split(":")[0])
    assert latest == failed - 1, (latest, failed)
    assert not os.path.exists(os.path.join(save, f"iter_{failed:07d}"))
    state = torch.load(os.path.join(save, f"iter_{latest:07d}", "mp_rank_00", "model_optim_rng.pt"),
                       weights_only=True)
    assert state["iteration"] == latest


def check_missing_data_prefix_refused(tmp):
    p = inputs(root_of(tmp))
    argv = fx.train_argv(p["qwen3"], os.path.join(tmp, "nope"), iters=1)
    expect_user_error(argv, "nope_packed_input_ids_document", "preprocess_data.py")


def check_sample_longer_than_seq_length_refused(tmp):
    p = inputs(root_of(tmp))
    expect_user_error(fx.train_argv(p["qwen3"], p["long"], iters=1, seq=32), "--seq-length 32", "sample")


def check_tp_not_dividing_heads_refused(tmp):
    p = inputs(root_of(tmp))
    expect_user_error(fx.train_argv(p["heads3"], p["toy"], iters=1, extra=["--tensor-model-parallel-size", "2"]),
                      "--tensor-model-parallel-size=2 does not divide num_attention_heads=3")


def check_checkpoint_of_other_layout_refused(tmp):
    p = inputs(root_of(tmp))
    save = os.path.join(tmp, "ckpt")
    train(base_argv(p, extra=["--save", save], iters=1))  # TP1 PP1 (DP2)
    expect_user_error(fx.train_argv(save, p["toy"], iters=1, extra=["--tensor-model-parallel-size", "2"]),
                      "tensor-model-parallel-size 1", "this run uses 2", "convert_ckpt.py")
    expect_user_error(fx.train_argv(save, p["toy"], iters=1, extra=["--num-layers", "4"]),
                      "a different model", "num_layers 2 vs 4")


# --------------------------------------------------------------------------------------------- LoRA

LORA = ["--lora-target-modules", "all-linear", "--lora-r", "8", "--lora-alpha", "16"]


def lora_argv(p: dict, extra: list[str] | None = None, iters: int = ITERS) -> list[str]:
    return fx.train_argv(p["qwen3"], p["toy"], iters=iters, gbs=4, mbs=1, seq=32, lr=1e-2, extra=LORA + (extra or []))


def check_loraplus_ratio_scales_the_b_updates(tmp):
    """--loraplus-lr-ratio 4 over one Adam step from B = 0: every B moves exactly 4x as far as without it (Adam's
    step is linear in the learning rate) and every A the same; the logged learning rate stays --lr."""
    p = inputs(root_of(tmp))

    def adapters(argv):
        trainer, result = train(argv)
        return {n: prm.detach().clone() for n, prm in trainer.model.named_parameters() if ".lora_" in n}, result

    plain, _ = adapters(lora_argv(p, iters=1))
    plus, result = adapters(lora_argv(p, ["--loraplus-lr-ratio", "4"], iters=1))
    assert abs(result.learning_rates[0][1] - 1e-2) < 1e-12, result.learning_rates
    b = [n for n in plain if ".lora_B." in n]
    assert b and len(b) * 2 == len(plain)
    for n, w in plain.items():
        if ".lora_B." in n:
            assert w.abs().max() > 0, n
            torch.testing.assert_close(plus[n], 4 * w, rtol=1e-6, atol=0, msg=n)
        else:
            assert torch.equal(plus[n], w), n


def check_neftune_noise_under_sequence_parallel(tmp):
    """--neftune-noise-alpha 5 at TP=2 with sequence parallelism: the embedding's output (each rank's half of
    the positions) gets noise within alpha / sqrt(L * hidden) for the whole row's L, independent between the
    two halves, none in eval mode; LoRA training runs with it and its first loss differs from the run
    without."""
    p = inputs(root_of(tmp))
    extra = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
    trainer, noisy = train(lora_argv(p, extra + ["--neftune-noise-alpha", "5"], iters=2))
    _, plain = train(lora_argv(p, extra, iters=2))
    assert noisy.losses[0][1] != plain.losses[0][1] and all(v == v for _, v in noisy.losses)
    embedding = trainer.model.embedding
    ids = torch.randint(0, 100, (2, 32))
    pos = torch.arange(32).expand(2, 32)
    embedding.eval()
    with torch.no_grad():
        clean = embedding(ids, pos)
        assert torch.equal(embedding(ids, pos), clean)
        embedding.train()
        noise = embedding(ids, pos) - clean
    hidden = clean.shape[-1]
    assert clean.shape[0] == 16  # this rank's half of the 32 positions
    width = 5 / (32 * hidden) ** 0.5
    assert 0.9 * width < noise.abs().max() <= width * (1 + 1e-6)
    halves = [torch.zeros_like(noise) for _ in range(2)]
    dist.all_gather(halves, noise.contiguous(), group=_tp_group())
    assert not torch.equal(halves[0], halves[1])


def _tp_group():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group()


def _lora_parity(tmp: str, extra: list[str]) -> None:
    root = root_of(tmp)
    _, result = train(lora_argv(inputs(root), extra))
    assert_close_to_ref(result, load_ref(root, "lora_qwen3"), "LoRA " + " ".join(extra))


def check_lora_tp2_matches_single_rank(tmp):
    _lora_parity(tmp, ["--tensor-model-parallel-size", "2"])


def check_lora_tp2_sequence_parallel_matches_single_rank(tmp):
    # replicated adapter halves (A of column-, B of row-parallel) see sequence shards: grads summed over TP
    _lora_parity(tmp, ["--tensor-model-parallel-size", "2", "--sequence-parallel"])


def check_lora_split_recompute_tp2_sp_cclora_and_pp2_match_single_rank(tmp):
    split = ["--recompute-granularity", "full", "--recompute-method", "split"]
    _lora_parity(tmp, ["--tensor-model-parallel-size", "2", "--sequence-parallel", *split])
    _lora_parity(tmp, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--lora-fusion", *split])
    # TP=1 per stage: the fused linears whose recomputation skips linear_proj's / linear_fc2's output GEMMs
    _lora_parity(tmp, ["--pipeline-model-parallel-size", "2", *split])


def check_full_finetuning_split_recompute_dp2_matches_single_rank(tmp):
    _parity(tmp, ["--recompute-granularity", "full", "--recompute-method", "split"])


def check_lora_dp2_distributed_optimizer_matches_single_rank(tmp):
    _lora_parity(tmp, ["--use-distributed-optimizer"])


def check_lora_full_recompute_pp2_trains_a_and_b_on_every_stage(tmp):
    from mindspeed_lora.lora import adapter_state_dict

    root = root_of(tmp)
    p = inputs(root)
    argv = lora_argv(p, ["--pipeline-model-parallel-size", "2", "--recompute-granularity", "full",
                         "--recompute-method", "uniform", "--recompute-num-layers", "1"])
    from mindspeed_lora.arguments import parse_args
    from mindspeed_lora.training.config import training_config_from_args
    from mindspeed_lora.training.sft import SFTTrainer

    trainer = SFTTrainer(training_config_from_args(parse_args("posttrain_gpt", argv + [
        "--loss-curve", os.path.join(tmp, "curve.png")])))
    trainer.setup()
    before = {k: v.detach().clone() for k, v in adapter_state_dict(trainer.model).items()}
    result = trainer.train()
    after = adapter_state_dict(trainer.model)
    assert before and set(before) == set(after)
    assert {k.split(".lora_")[1].split(".")[0] for k in before} == {"A", "B"}
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"stage {trainer.rank.pp_rank}: adapters not trained: {unchanged}"
    frozen = [n for n, prm in trainer.model.named_parameters() if prm.requires_grad and ".lora_" not in n]
    assert not frozen, frozen
    assert_close_to_ref(result, load_ref(root, "lora_qwen3"), "LoRA PP2 full recompute")


def check_lora_checkpoint_is_adapter_only_and_resumes_bitwise(tmp):
    from mindspeed_lora.lora import is_lora_key

    p = inputs(root_of(tmp))
    save = os.path.join(tmp, "lora")
    extra = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
    _, full = train(lora_argv(p, extra + ["--save", save, "--save-interval", "3"], iters=6))
    meta = json.load(open(os.path.join(save, "mindspeed_lora.json")))
    assert meta["lora"] == {"r": 8, "alpha": 16, "dropout": 0.0, "use_rslora": False,
                            "target_modules": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]}
    for tp in (0, 1):
        state = torch.load(os.path.join(save, "iter_0000003", f"mp_rank_{tp:02d}", "model_optim_rng.pt"),
                           weights_only=True)
        keys = set(state["model"])
        assert keys and all(is_lora_key(k) and k.endswith((".lora_A.default.weight", ".lora_B.default.weight"))
                            for k in keys), sorted(keys)
        assert len(keys) == 2 * 4 * 2  # A and B x four linears x two layers
    # --ckpt-step picks the iteration of the adapter checkpoint (--lora-load), not of the base model (--load)
    _, resumed = train(lora_argv(p, extra + ["--lora-load", save, "--ckpt-step", "3"], iters=6))
    assert resumed.start_iteration == 3
    assert [v for _, v in resumed.losses] == [v for i, v in full.losses if i > 3]
    # --finetune with --lora-load: the adapter weights, but iteration 0 and a fresh optimizer
    _, tuned = train(lora_argv(p, extra + ["--lora-load", save, "--finetune"], iters=2))
    assert tuned.start_iteration == 0 and tuned.losses[0][1] < full.losses[0][1] - 1e-3


def check_lora_checkpoint_of_another_rank_or_model_refused(tmp):
    p = inputs(root_of(tmp))
    save = os.path.join(tmp, "lora")
    train(lora_argv(p, ["--save", save], iters=1))
    bad_rank = fx.train_argv(p["qwen3"], p["toy"], iters=1, extra=[
        "--lora-target-modules", "all-linear", "--lora-r", "4", "--lora-alpha", "16", "--lora-load", save])
    expect_user_error(bad_rank, "--lora-load", "other LoRA settings", "r 8 vs 4")
    other_model = fx.train_argv(p["qwen2"], p["toy"], iters=1, extra=LORA + ["--lora-load", save])
    expect_user_error(other_model, "--lora-load", "a different model", "family 'qwen3' vs 'qwen2'")
    expect_user_error(fx.train_argv(save, p["toy"], iters=1), "a LoRA adapter checkpoint", "--lora-load")


# --------------------------------------------------------------------------------------------- converter

def _convert(*argv: str) -> None:
    """convert_ckpt.py on global rank 0 (a separate process: it sets up its own world of one)."""
    import subprocess
    import sys

    if dist.get_rank() == 0:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=root)
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
                  "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID"):
            env.pop(k, None)
        proc = subprocess.run([sys.executable, os.path.join(root, "convert_ckpt.py"), "--no-progress", *argv],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    dist.barrier()


def check_converted_tp2_checkpoint_trains_and_its_lora_converts_back(tmp):
    """convert_ckpt.py hf -> mg (TP=2) feeds training; the LoRA checkpoint training writes merges back to HF."""
    root = root_of(tmp)
    p = inputs(root)
    mcore, lora, merged = (os.path.join(tmp, n) for n in ("mcore", "lora", "merged"))
    _convert("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", p["qwen3"], "--save-dir", mcore,
             "--target-tensor-parallel-size", "2")
    _, result = train(fx.train_argv(mcore, p["toy"], iters=ITERS, gbs=4, mbs=1, seq=32, lr=1e-2,
                                    extra=LORA + ["--tensor-model-parallel-size", "2", "--save", lora]))
    assert_close_to_ref(result, load_ref(root, "lora_qwen3"), "LoRA from a converted TP2 checkpoint")
    _convert("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", mcore, "--lora-load", lora,
             "--save-dir", merged)
    if dist.get_rank() == 0:
        from mindspeed_lora.checkpoint.hf_reader import HFCheckpointReader

        base, out = HFCheckpointReader(p["qwen3"]), HFCheckpointReader(merged)
        name = "model.layers.1.mlp.down_proj.weight"
        assert not torch.equal(base.read(name), out.read(name))  # the trained adapter was merged in
        assert torch.equal(base.read("model.embed_tokens.weight"), out.read("model.embed_tokens.weight"))


# ---------------------------------------------------------------------- fused cross-entropy and CCLoRA

FUSED_CE = ["--use-fused-linear-cross-entropy"]


def check_fused_linear_cross_entropy_tp2_sp_matches_single_rank(tmp):
    # loss from the final hidden states through the chunked linear CE (vocab-parallel, SP gather inside)
    _parity(tmp, ["--tensor-model-parallel-size", "2", "--sequence-parallel", *FUSED_CE])


def check_fused_linear_cross_entropy_pp2_tied_matches_single_rank(tmp):
    # the last stage's copy of the tied embedding is the CE weight; its grad is synced with the first stage's
    _parity(tmp, ["--pipeline-model-parallel-size", "2", *FUSED_CE], ref="full_qwen2", model="qwen2")


def check_lora_fusion_tp2_sp_matches_unfused_over_ten_steps(tmp):
    root = root_of(tmp)
    p = inputs(root)
    tp2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
    _, plain = train(lora_argv(p, tp2, iters=10))
    _, fused = train(lora_argv(p, tp2 + ["--lora-fusion"], iters=10))
    got, want = [v for _, v in fused.losses], [v for _, v in plain.losses]
    assert len(got) == len(want) == 10
    assert want[-1] < want[0]  # the adapters really trained, so equal losses mean equal updates
    for i, (g, w) in enumerate(zip(got, want)):
        assert abs(g - w) <= 1e-5 * abs(w), f"--lora-fusion step {i + 1}: loss {g!r} vs unfused {w!r}"


def check_lora_fusion_with_overlap_param_gather_refused(tmp):
    p = inputs(root_of(tmp))
    expect_user_error(lora_argv(p, ["--lora-fusion", "--use-distributed-optimizer", "--overlap-param-gather"]),
                      "--lora-fusion", "--overlap-param-gather")
