"""inference.py and evaluation.py as users run them (subprocesses), checked against HF transformers."""
import json
import os
import subprocess
import sys
from fractions import Fraction

import pytest
import torch

from mindspeed_lora import tiny
from tests.unit.test_evaluation import independent_accuracy, make_exam
from tests.unit.test_evaluation_gsm8k import hf_greedy, independent_number, independent_prompt, make_gsm8k
from tests.unit.test_inference import build_lively_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, MINDSPEED_LORA_DEVICE="cpu", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2",
           PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def run(script, *args, stdin=None, check=True):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], env=ENV, capture_output=True,
                          text=True, input=stdin, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cli_model"))
    hf = build_lively_model("qwen3", path, seed=14, max_position_embeddings=1024)
    tok = tiny.build_tokenizer(path)
    return path, hf, tok


def test_input_file_greedy_equals_hf_generate(hf_dir, tmp_path):
    path, hf, tok = hf_dir
    prompts = ["The quick brown fox", "Give three tips for staying healthy:", "中国的首都是"]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": p, "id": i}, ensure_ascii=False) + "\n"
                           for i, p in enumerate(prompts)))
    out = tmp_path / "out.jsonl"
    run("inference.py", "--load", path, "--input-file", str(src), "--output-file", str(out), "--task", "greedy",
        "--max-new-tokens", "30", "--micro-batch-size", "2")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2]
    for prompt, row in zip(prompts, rows):
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            new = hf.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False,
                              eos_token_id=tok.eos_token_id, pad_token_id=0)[0, len(ids):].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        assert row["response"] == tok.decode(new, skip_special_tokens=True)
        assert row["finish_reason"] in ("stop", "length") and row["task"] == "greedy"


def test_chat_with_template_streams_and_keeps_history(hf_dir):
    path, _, _ = hf_dir
    proc = run("inference.py", "--load", path, "--task", "chat", "--prompt-type", "qwen3", "--stream",
               "--max-new-tokens", "12", "--history-turns", "2",
               stdin="Hello! Who are you?\nWhat is your name?\nq\n")
    assert proc.stdout.count("You >> ") == 3
    assert proc.stdout.count("Assistant:") == 2


def test_evaluation_cli_with_lora_equals_independent_scorer_on_merged_model(hf_dir, tmp_path):
    """evaluation.py --lora-load: accuracy of base + adapter equals the independent scorer on the merged model."""
    pytest.importorskip("mindspeed_lora.lora.spec", reason="the LoRA package (mindspeed_lora/lora) is not in this tree")
    from mindspeed_lora.parallel import initialize
    from tests.unit.test_inference_lora import (
        ALPHA,
        R,
        _megatron_state,
        _write_adapter_checkpoint,
        merged_hf_model,
        random_adapter,
    )

    path, hf, tok = hf_dir
    initialize(1, 1)
    state = _megatron_state(path)
    adapter = random_adapter(state, seed=5)
    lora_dir = str(tmp_path / "lora")
    _write_adapter_checkpoint(lora_dir, path, adapter)
    merged = merged_hf_model(hf, path, state, adapter, ALPHA / R)
    root = make_exam(str(tmp_path / "mmlu"), n_test=4)
    out_dir = tmp_path / "results"
    proc = run("evaluation.py", "--load", path, "--lora-load", lora_dir, "--task", "mmlu", "--task-data-path", root,
               "--eval-output-dir", str(out_dir), "--evaluation-batch-size", "3")
    summary = json.loads((out_dir / "mmlu_accuracy.json").read_text())
    ref = independent_accuracy(merged, tok, root, "mmlu")
    assert {s: v["correct"] for s, v in summary["subjects"].items()} == {s: r[0] for s, r in ref.items()}
    assert summary["overall"]["total"] == sum(r[1] for r in ref.values())
    preds = [json.loads(line) for line in (out_dir / "mmlu_predictions.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in preds] == [letter for r in ref.values() for letter in r[2]]
    base = [letter for r in independent_accuracy(hf, tok, root, "mmlu").values() for letter in r[2]]
    assert [p["prediction"] for p in preds] != base, "the adapter changed no answer: a weak test"
    assert "overall" in proc.stdout and "accuracy" in proc.stdout


def test_evaluation_cli_cmmlu_and_gsm8k_in_their_release_layouts(hf_dir, tmp_path):
    """Two new tasks in one run, each in the layout it is released in: CMMLU (test/<subject>.csv with the header
    ,Question,A,B,C,D,Answer) scored by logits, GSM8K (test.jsonl + train.jsonl) by greedy generation."""
    path, hf, tok = hf_dir
    cmmlu = make_exam(str(tmp_path / "cmmlu"), subjects=("agronomy",), n_test=4, style="cmmlu")
    gsm8k = make_gsm8k(str(tmp_path / "gsm8k"), n_test=3, n_train=2)
    out_dir = tmp_path / "results"
    proc = run("evaluation.py", "--load", path, "--task", "cmmlu", "gsm8k", "--task-data-path", cmmlu, gsm8k,
               "--num-shots", "1", "--max-new-tokens", "16", "--eval-output-dir", str(out_dir))
    summary = json.loads((out_dir / "cmmlu_accuracy.json").read_text())
    ref = independent_accuracy(hf, tok, cmmlu, "cmmlu", shots=1)
    assert summary["subjects"]["agronomy"]["correct"] == ref["agronomy"][0] and summary["split"] == "test"
    preds = [json.loads(line) for line in (out_dir / "cmmlu_predictions.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in preds] == ref["agronomy"][2]

    train = [json.loads(line) for line in open(os.path.join(gsm8k, "train.jsonl"))]
    preds = [json.loads(line) for line in (out_dir / "gsm8k_predictions.jsonl").read_text().splitlines()]
    for p, q in zip(preds, (json.loads(line) for line in open(os.path.join(gsm8k, "test.jsonl")))):
        text = hf_greedy(hf, tok, independent_prompt(q["question"], train[:1]), max_new_tokens=16)
        number = independent_number(text)
        assert p["response"] == text
        assert (Fraction(p["prediction"]) if p["prediction"] else None) == number
    summary = json.loads((out_dir / "gsm8k_accuracy.json").read_text())
    assert (summary["split"], summary["method"], summary["overall"]["total"]) == ("test", "generate", 3)
    assert "gsm8k (test split, 1-shot, generate)" in proc.stdout


def test_bad_input_gives_one_clear_line(hf_dir, tmp_path):
    path, _, _ = hf_dir
    # the other messages are unit-tested (test_inference_chat.py, test_evaluation.py); here: the CLI's form
    cases = [
        (("inference.py", "--load", str(tmp_path / "nope")), "--load"),
        (("evaluation.py", "--load", path, "--task", "mmlu", "--task-data-path", str(tmp_path)),
         "expected the exam CSV layout"),
    ]
    for args, message in cases:
        proc = run(*args, check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last, last
