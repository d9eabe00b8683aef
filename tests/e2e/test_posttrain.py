"""posttrain_gpt.py end to end, as users run it: logs, validation, TensorBoard, loss curve, checkpoint files."""
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

from tests import training_fixtures as fx

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(argv, nproc=1, timeout=300):
    env = dict(os.environ, MINDSPEED_LORA_DEVICE="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=ROOT)
    script = os.path.join(ROOT, "posttrain_gpt.py")
    cmd = [sys.executable, script, *argv] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
         script, *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def losses_of(stdout: str) -> list[float]:
    return [float(x) for x in re.findall(r"\| lm loss: ([0-9.E+-]+) \|", stdout)]


def preprocess(root, model: str, name: str, *extra: str) -> str:
    """Alpaca-style arithmetic questions through preprocess_data.py (the real data pipeline)."""
    src = root / "alpaca.json"
    if not src.exists():
        import random

        rng = random.Random(0)
        rows = []
        for _ in range(64):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            rows.append({"instruction": f"What is {a} + {b}?", "input": "", "output": f"The answer is {a + b}."})
        src.write_text(json.dumps(rows))
    prefix = str(root / "data" / name)
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "preprocess_data.py"), "--input", str(src),
                           "--output-prefix", prefix, "--handler-name", "AlpacaStyleInstructionHandler",
                           "--tokenizer-name-or-path", model, "--prompt-type", "qwen3", "--seq-length", "128",
                           "--no-progress", *extra], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return prefix


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("posttrain")
    model = fx.tiny_model_dir(str(root), "qwen3")
    from mindspeed_lora import tiny

    tiny.build_tokenizer(model)
    return {"root": root, "model": model, "data": preprocess(root, model, "alpaca")}


def test_full_finetuning_cli_logs_validates_saves_and_plots(inputs):
    root = inputs["root"]
    save, tb, curve = root / "full_save", root / "tb", root / "curve.png"
    argv = fx.train_argv(inputs["model"], inputs["data"], iters=12, gbs=8, mbs=4, seq=128, lr=3e-3, extra=[
        "--split", "80,20,0", "--eval-interval", "6", "--eval-iters", "1", "--save", str(save),
        "--save-interval", "6", "--tensorboard-dir", str(tb), "--loss-curve", str(curve),
        "--tokenizer-name-or-path", inputs["model"], "--prompt-type", "qwen3", "--is-instruction-dataset",
        "--use-mcore-models", "--swiglu", "--normalization", "RMSNorm", "--variable-seq-lengths"])
    proc = run_cli(argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    losses = losses_of(out)
    assert len(losses) == 12 and sum(losses[-3:]) < 0.88 * sum(losses[:3]), losses
    for field in ("consumed samples:           96", "learning rate:", "grad norm:", "number of skipped iterations:",
                  "tokens/s:", "TFLOP/s per device:", "mem GiB alloc/peak/reserved:"):
        assert field in out, field
    valid = re.findall(r"validation loss at iteration (\d+) \| lm loss value: ([0-9.E+-]+)", out)
    assert [int(i) for i, _ in valid] == [6, 12] and float(valid[1][1]) < float(valid[0][1])
    assert f"loss curve written to {curve}" in out and curve.read_bytes()[:4] == b"\x89PNG"
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tb))
    # the checkpoint: Megatron layout, metadata, HF config and tokenizer beside it, weights_only-loadable
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "12"
    assert sorted(p for p in os.listdir(save) if p.startswith("iter_")) == ["iter_0000006", "iter_0000012"]
    meta = json.loads((save / "mindspeed_lora.json").read_text())
    assert {k: meta[k] for k in ("format_version", "tensor_model_parallel_size", "pipeline_model_parallel_size",
                                 "num_layer_list", "params_dtype", "lora", "iteration")} == \
        {"format_version": 1, "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
         "num_layer_list": [2], "params_dtype": "float32", "lora": None, "iteration": 12}
    assert meta["arch"]["family"] == "qwen3"
    assert {"config.json", "tokenizer.json"} <= set(os.listdir(save / "hf_config"))
    state = torch.load(save / "iter_0000012" / "mp_rank_00" / "model_optim_rng.pt", weights_only=True)
    assert state["iteration"] == 12 and state["training"]["consumed_train_samples"] == 96
    assert "decoder.layers.1.mlp.linear_fc2.weight" in state["model"] and "output_layer.weight" in state["model"]
    assert not [k for k in state["model"] if "_extra_state" in k]
    assert state["args"]["lr"] == 3e-3 and {"optimizer", "opt_param_scheduler", "rng_state"} <= set(state)
    assert not [p for p in os.listdir(save) if ".tmp-" in p]


def test_bad_data_prefix_is_one_clear_line(inputs):
    proc = run_cli(fx.train_argv(inputs["model"], str(inputs["root"] / "no_such_prefix"), iters=1))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --data-path ") and "no_such_prefix_packed_input_ids_document.bin" \
        in proc.stderr and "preprocess_data.py" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_lora_cli_on_neat_packed_data_saves_adapters_only(inputs):
    """The quickstart's tiny LoRA run, on data packed by preprocess_data.py --neat-pack, under torchrun."""
    root = inputs["root"]
    packed = preprocess(root, inputs["model"], "alpaca_packed", "--neat-pack")
    save = root / "lora_save"
    argv = ["--stage", "sft", "--load", inputs["model"], "--data-path", packed, "--tokenizer-name-or-path",
            inputs["model"], "--prompt-type", "qwen3", "--seq-length", "128", "--neat-pack",
            "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "8", "--lr", "5e-2",
            "--lr-decay-style", "cosine", "--min-lr", "5e-3", "--lr-warmup-iters", "1", "--weight-decay", "0",
            "--lora-r", "8", "--lora-alpha", "16", "--lora-target-modules", "all-linear",
            "--tensor-model-parallel-size", "2", "--sequence-parallel", "--save", str(save), "--log-interval", "1"]
    proc = run_cli(argv, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = losses_of(proc.stdout)
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    assert "(LoRA)" in proc.stdout and f"loss curve written to {save / 'loss_curve.png'}" in proc.stdout
    meta = json.loads((save / "mindspeed_lora.json").read_text())
    assert meta["lora"]["r"] == 8 and meta["tensor_model_parallel_size"] == 2
    for tp in (0, 1):
        state = torch.load(save / "iter_0000008" / f"mp_rank_{tp:02d}" / "model_optim_rng.pt", weights_only=True)
        assert state["model"] and all(k.endswith((".lora_A.default.weight", ".lora_B.default.weight"))
                                      for k in state["model"])
