"""preprocess_data.py as users run it: MindSpeed-LLM flags on the shipped demo data, errors as one line with
exit code 2, and no file under a final name after Ctrl-C or kill -9 in the middle of a run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "preprocess_data.py")
DEMO = os.path.join(ROOT, "examples", "mcore", "tiny", "data")
KEYS = ("input_ids", "attention_mask", "labels")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from mindspeed_lora.tiny import build_tokenizer

    d = str(tmp_path_factory.mktemp("tok"))
    build_tokenizer(d)
    return d


def cli(*args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return [sys.executable, SCRIPT, *args], env


def final_files(prefix):
    return [f"{prefix}_packed_{k}_document{e}" for k in KEYS for e in (".bin", ".idx")] + [f"{prefix}_summary.json"]


def test_demo_data_with_mindspeed_flags(tmp_path, tok_dir):
    prefix = str(tmp_path / "out" / "tiny")
    cmd, env = cli("--input", f"{DEMO}/self_cognition.jsonl,{DEMO}/alpaca_demo.jsonl",
                   "--tokenizer-name-or-path", tok_dir, "--tokenizer-type", "PretrainedFromHF",
                   "--output-prefix", prefix, "--handler-name", "AlpacaStyleInstructionHandler",
                   "--prompt-type", "qwen3", "--workers", "2", "--log-interval", "1000", "--overwrite-cache",
                   "--seq-length", "256", "--model-name", "Tiny", "--model-author", "Mindspeed-LoRA", "--no-progress")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "preprocess_data: 100 samples read, 100 written" in p.stdout
    assert all(os.path.isfile(f) for f in final_files(prefix))
    with open(f"{prefix}_summary.json") as f:
        assert json.load(f)["args"]["model_name"] == "Tiny"
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    ds = IndexedDataset(f"{prefix}_packed_input_ids_document")
    text = AutoTokenizer.from_pretrained(tok_dir).decode(ds[0].tolist())
    assert text == ("<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
                    "I am Tiny, an AI assistant developed by Mindspeed-LoRA. How can I help you today?<|im_end|>\n")


def test_bad_input_is_one_line_and_exit_2(tmp_path, tok_dir):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', encoding="utf-8")
    cmd, env = cli("--input", str(src), "--tokenizer-name-or-path", tok_dir, "--output-prefix",
                   str(tmp_path / "o"), "--handler-name", "AlpacaStyleInstructionHandler", "--prompt-type", "chatml")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == (
        f"error: {src}:2 (sample 2): no key 'output'; the sample has ['instruction'] "
        "(--skip-bad-samples skips such samples)")
    assert "Traceback" not in p.stderr
    assert os.listdir(tmp_path) == ["bad.jsonl"]


def test_interrupted_runs_leave_no_final_files(tmp_path, tok_dir):
    """kill -9 and Ctrl-C (SIGINT, with worker processes) while the data is being written: nothing under the
    final names."""
    line = json.dumps({"instruction": "Give three tips for staying healthy.", "input": "",
                       "output": "Eat well, sleep enough and exercise. " * 4}) + "\n"
    src = tmp_path / "big.jsonl"
    src.write_text(line * 300_000)
    runs = {}
    for sig in (signal.SIGKILL, signal.SIGINT):
        out = tmp_path / sig.name
        out.mkdir()
        cmd, env = cli("--input", str(src), "--tokenizer-name-or-path", tok_dir, "--output-prefix",
                       str(out / "ds"), "--handler-name", "AlpacaStyleInstructionHandler", "--prompt-type",
                       "qwen3", "--no-progress", "--workers", "1" if sig == signal.SIGKILL else "2")
        runs[sig] = (out, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    pending = dict(runs)
    deadline = time.time() + 240
    while pending and time.time() < deadline:  # signal each run once its staged .bin files hold data
        for sig, (out, proc) in list(pending.items()):
            assert proc.poll() is None, f"the run ended before it could be interrupted: {proc.communicate()}"
            staging = [d for d in os.listdir(out) if d.startswith(".ds.tmp-")]
            if staging and any(os.path.getsize(out / staging[0] / f) > 0 for f in os.listdir(out / staging[0])):
                proc.send_signal(sig)
                del pending[sig]
        time.sleep(0.05)
    assert not pending, "timed out waiting for the runs to start writing"
    for sig, (out, proc) in runs.items():
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode != 0
        left = os.listdir(out)
        assert not any(os.path.exists(f) for f in final_files(str(out / "ds"))), left
        if sig == signal.SIGKILL:  # only the hidden staging directory remains
            assert len(left) == 1 and left[0].startswith(".ds.tmp-")
        else:  # Ctrl-C cleans up after itself
            assert left == [], left
            assert "interrupted" in stderr
