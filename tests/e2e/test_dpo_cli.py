"""posttrain_gpt.py --stage dpo as users run it after SFT: HF -> mcore, LoRA SFT, merge (convert_ckpt.py mg -> hf
with --lora-load), preference data through preprocess_data.py's pairwise handler, then LoRA DPO on the merged
model; the reward metrics reach the log and TensorBoard and an adapter checkpoint is written."""
import json
import os
import re
import subprocess
import sys

from tests import training_fixtures as fx
from tests.e2e.test_posttrain import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LORA = ["--lora-target-modules", "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "--lora-r", "8",
        "--lora-alpha", "16"]


def _script(name, *argv):
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=ROOT, MINDSPEED_LORA_DEVICE="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, name), *argv], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
    return proc


def _preference_json(path):
    rows = []
    for a in range(1, 9):
        for b in range(1, 5):
            rows.append({"instruction": f"What is {a} + {b}?", "input": "",
                         "chosen": f"The answer is {a + b}.", "rejected": f"I do not know, maybe {a * b + 7}!"})
    path.write_text(json.dumps(rows))
    return str(path)


def test_lora_dpo_on_a_merged_sft_model(tmp_path):
    from mindspeed_lora import tiny

    hf = fx.tiny_model_dir(str(tmp_path), "qwen3")
    tiny.build_tokenizer(hf)
    mcore, sft, merged = (str(tmp_path / n) for n in ("mcore", "sft_lora", "merged"))
    _script("convert_ckpt.py", "--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", hf,
            "--save-dir", mcore, "--no-progress")
    sft_data = fx.write_sft_data(str(tmp_path / "data" / "sft"), fx.toy_samples(8))
    proc = run_cli(fx.train_argv(mcore, sft_data, iters=2, extra=[*LORA, "--save", sft]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _script("convert_ckpt.py", "--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", mcore,
            "--lora-load", sft, "--save-dir", merged, "--no-progress")
    pref = str(tmp_path / "data" / "pref")
    _script("preprocess_data.py", "--input", _preference_json(tmp_path / "pref.json"), "--output-prefix", pref,
            "--handler-name", "AlpacaStylePairwiseHandler", "--tokenizer-name-or-path", hf,
            "--prompt-type", "qwen3", "--seq-length", "64", "--no-progress")

    tb, out = str(tmp_path / "tb"), str(tmp_path / "dpo_lora")
    proc = run_cli(["--stage", "dpo", "--load", merged, "--data-path", pref, "--seq-length", "64",
                    "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", "12", "--lr", "1e-2",
                    "--lr-decay-style", "constant", "--weight-decay", "0", "--dpo-beta", "0.5", *LORA,
                    "--save", out, "--tensorboard-dir", tb, "--log-interval", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if "| dpo |" in ln]
    assert len(lines) == 12, proc.stdout[-3000:]
    metrics = [dict((k, float(v)) for k, v in re.findall(r"([a-z/]+): ([-0-9.E+]+)", ln)) for ln in lines]
    for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen",
              "logps/rejected"):
        assert k in metrics[0], (k, lines[0])
    assert abs(metrics[0]["loss"] - 0.693147) < 1e-5  # adapters start at B = 0: policy == reference
    assert min(m["rewards/accuracy"] for m in metrics[-3:]) > 0.9, [m["rewards/accuracy"] for m in metrics]
    assert metrics[-1]["rewards/margin"] > 2 * metrics[1]["rewards/margin"] > 0, \
        [m["rewards/margin"] for m in metrics]
    assert os.path.isfile(os.path.join(out, "latest_checkpointed_iteration.txt"))
    meta = json.load(open(os.path.join(out, "mindspeed_lora.json")))
    assert meta["lora"]["r"] == 8

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"rewards/accuracy", "rewards/margin", "logps/chosen", "loss"} <= tags, tags
    assert len(acc.Scalars("rewards/accuracy")) == 12
