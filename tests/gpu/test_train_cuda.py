"""End to end on a CUDA GPU: posttrain_gpt.py in bf16 with every fused op on gives the losses of the same run
with every fused op off (the torch references), within bf16 tolerance.

A 4-layer Qwen3 (hidden 512, GQA 8/4, weights std 0.1 so that the first losses already depend on every op)
trains 12 steps on neat-packed rows (varlen flash attention vs the reference's segment mask) and on
unpacked rows; LoRA (the TP=1 fused base+adapter linear) and full fine-tuning.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from tests import training_fixtures as fx

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FUSED_OFF = ["--no-use-fused-rmsnorm", "--no-use-fused-swiglu", "--no-use-fused-rotary-pos-emb",
             "--no-use-flash-attn", "--no-use-fused-linear-cross-entropy"]
SEQ = 256


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from mindspeed_lora import tiny

    root = tmp_path_factory.mktemp("gpu_train")
    model = str(root / "hf")
    tiny.build_hf_model("qwen3", model, seed=3, dtype="bfloat16", hidden_size=512, intermediate_size=1024,
                        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                        max_position_embeddings=1024, initializer_range=0.1)
    samples = fx.toy_samples(400, seed=5, min_prompt=8, max_prompt=40, response=12)
    return {"model": model,
            "packed": fx.write_sft_data(str(root / "packed"), fx.neat_pack(samples, SEQ)),
            "plain": fx.write_sft_data(str(root / "plain"), samples)}


def train(inputs, data: str, extra: list[str]) -> list[float]:
    argv = fx.train_argv(inputs["model"], inputs[data], iters=12, gbs=8, mbs=2, seq=SEQ, lr=2e-3,
                         extra=["--bf16", *extra])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               PYTHONWARNINGS="ignore", MINDSPEED_LORA_DEVICE="cuda")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "posttrain_gpt.py"), *argv], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"\| lm loss: ([0-9.E+-]+) \|", proc.stdout)]
    assert len(losses) == 12, proc.stdout[-2000:]
    return losses


@pytest.mark.parametrize("data,tuning", [("packed", "lora"), ("plain", "lora"), ("packed", "full")])
def test_fused_ops_on_equal_off_within_bf16(inputs, data, tuning):
    extra = ["--neat-pack"] if data == "packed" else ["--variable-seq-lengths"]
    if tuning == "lora":
        extra += ["--lora-r", "16", "--lora-alpha", "32", "--lora-target-modules", "all-linear"]
    on = train(inputs, data, extra)
    off = train(inputs, data, extra + FUSED_OFF)
    assert on[-1] < on[0] - 0.1, on  # it learns, so the later steps compare trained weights too
    worst = max(abs(a - b) / abs(b) for a, b in zip(on, off))
    print(f"{data} {tuning}: fused {on[0]:.4f} -> {on[-1]:.4f}, reference {off[0]:.4f} -> {off[-1]:.4f}, "
          f"max relative difference {worst:.2e}")
    assert worst <= 2e-2, (on, off)


def test_split_recompute_equals_no_recompute(inputs):
    """--recompute-method split on the TP=1 fused LoRA path (reentrant half-layer checkpoints whose
    recomputation skips linear_proj's and linear_fc2's output GEMMs) trains as without recompute."""
    extra = ["--neat-pack", "--lora-r", "16", "--lora-alpha", "32", "--lora-target-modules", "all-linear"]
    plain = train(inputs, "packed", extra)
    split = train(inputs, "packed", extra + ["--recompute-granularity", "full", "--recompute-method", "split"])
    worst = max(abs(a - b) / abs(b) for a, b in zip(split, plain))
    print(f"split recompute {split[0]:.4f} -> {split[-1]:.4f}, none {plain[0]:.4f} -> {plain[-1]:.4f}, "
          f"max relative difference {worst:.2e}")
    assert worst <= 2e-3, (split, plain)


def test_deterministic_mode_repeats_bitwise(inputs):
    """--deterministic-mode: two full fine-tuning runs (embedding and attention backward included) give the
    same losses to the last bit."""
    extra = ["--neat-pack", "--deterministic-mode"]
    first = train(inputs, "packed", extra)
    second = train(inputs, "packed", extra)
    assert first == second, (first, second)
