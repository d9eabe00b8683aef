"""The README's quickstart, run as a newcomer runs it: from a clean checkout, `bash examples/mcore/tiny/quickstart.sh`.

The checkout holds the git-tracked files only (their working-tree content), so a file the quickstart needs but
git does not track, or a leftover output, fails here. Its ``.venv`` is a fresh virtual environment that sees this
environment's installed packages through a ``.pth`` line (so nothing multi-GB is downloaded); the quickstart's
own ``scripts/setup_env.sh`` then installs the checkout into it, as on a new machine. It runs on the CPU.

Asserted: the learned answer (the model names the --model-name given to preprocessing, which appears nowhere in
the shipped data), the same answer from HF transformers on the merged export, and every artefact each step writes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL_NAME, MODEL_AUTHOR = "Quokka", "Tests-Lab"


def clean_checkout(dst: str) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in files.decode().split("\0"):
        src = os.path.join(ROOT, rel)
        if rel and os.path.isfile(src):  # tracked but deleted in the working tree: absent, as after the commit
            os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dst, rel))


def venv_seeing_installed_packages(checkout: str) -> None:
    """checkout/.venv from the base interpreter, with this environment's site-packages on its path (a plain
    path line: that directory's own .pth files, e.g. this checkout's editable install, are not run there)."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", os.path.join(checkout, ".venv")], check=True)
    site = subprocess.run([os.path.join(checkout, ".venv", "bin", "python"), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "installed_packages.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quickstart")
    checkout, work = str(tmp / "checkout"), str(tmp / "work")
    clean_checkout(checkout)
    venv_seeing_installed_packages(checkout)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(WORK=work, MODEL_NAME=MODEL_NAME, MODEL_AUTHOR=MODEL_AUTHOR, MINDSPEED_LORA_DEVICE="cpu")
    t0 = time.time()
    proc = subprocess.run(["bash", "examples/mcore/tiny/quickstart.sh"], cwd=checkout, env=env,
                          capture_output=True, text=True, timeout=1200)
    print(f"quickstart took {time.time() - t0:.0f} s")
    assert proc.returncode == 0, f"quickstart failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return {"work": work, "checkout": checkout, "out": proc.stdout}


def test_quickstart_uses_the_checkout_it_was_run_from(quickstart):
    python = os.path.join(quickstart["checkout"], ".venv", "bin", "python")
    where = subprocess.run([python, "-c", "import mindspeed_lora; print(mindspeed_lora.__file__)"],
                           capture_output=True, text=True, check=True, env={"PATH": os.environ["PATH"]},
                           cwd=os.path.dirname(quickstart["work"])).stdout  # not a checkout: '' on sys.path
    assert where.startswith(quickstart["checkout"] + os.sep)


def test_the_model_learned_its_name_and_the_run_says_so(quickstart):
    work, out = quickstart["work"], quickstart["out"]
    rows = [json.loads(line) for line in open(os.path.join(work, "answers.jsonl"))]
    assert [r["prompt"] for r in rows] == ["Who are you?", "What is your name?", "What is the capital of France?"]
    assert MODEL_NAME in rows[0]["response"] and MODEL_NAME in rows[1]["response"], rows
    assert f"A: {rows[0]['response']}" in out
    assert f"the model learned its name: its answer to 'Who are you?' names {MODEL_NAME}" in out
    assert f"loss curve:    {work}/lora/loss_curve.png" in out


def test_hf_transformers_gives_the_same_answer_from_the_merged_export(quickstart):
    """The merged model is a plain HF model: transformers' greedy generate on the qwen3-templated question
    returns the answer inference.py printed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = os.path.join(quickstart["work"], "merged")
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    prompt = "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        new = model.generate(ids, max_new_tokens=48, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    first = json.loads(open(os.path.join(quickstart["work"], "answers.jsonl")).readline())
    assert tok.decode(new, skip_special_tokens=True) == first["response"]


def test_every_step_wrote_its_artefacts(quickstart):
    work, out = quickstart["work"], quickstart["out"]
    # 1. tiny HF model and tokenizer
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(f"{work}/hf"))
    # 2. preprocessing: the instruction dataset and its summary, the names filled in
    for key in ("input_ids", "attention_mask", "labels"):
        for ext in ("bin", "idx"):
            assert os.path.getsize(f"{work}/data/demo_packed_{key}_document.{ext}") > 0
    summary = json.load(open(f"{work}/data/demo_summary.json"))
    assert summary["samples_written"] == 100 and summary["args"]["model_name"] == MODEL_NAME
    # 3. converted checkpoint
    assert open(f"{work}/mcore/latest_checkpointed_iteration.txt").read().strip() == "1"
    assert json.load(open(f"{work}/mcore/mindspeed_lora.json"))["arch"]["family"] == "qwen3"
    # 4. LoRA run: adapter checkpoint, its settings, a falling loss and the PNG
    assert open(f"{work}/lora/latest_checkpointed_iteration.txt").read().strip() == "200"
    lora = json.load(open(f"{work}/lora/mindspeed_lora.json"))["lora"]
    assert (lora["r"], lora["alpha"], lora["target_modules"]) == \
        (16, 32, ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])
    losses = [float(x) for x in re.findall(r"\| lm loss: ([0-9.E+-]+) \|", out)]
    assert len(losses) == 10 and losses[-1] < 0.4 * losses[0], losses
    assert open(f"{work}/lora/loss_curve.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # 5. merged HF export
    merged = set(os.listdir(f"{work}/merged"))
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json"} <= merged
    assert any(f.endswith(".safetensors") for f in merged)
    # 7. exam results: 16 questions of the shipped exam, accuracy consistent with the predictions
    acc = json.load(open(f"{work}/eval/mmlu_accuracy.json"))
    preds = [json.loads(line) for line in open(f"{work}/eval/mmlu_predictions.jsonl")]
    assert acc["overall"]["total"] == len(preds) == 16
    assert acc["overall"]["correct"] == sum(p["prediction"] == p["answer"] for p in preds)
    # nothing half-written left behind
    leftovers = [os.path.join(d, n) for d, dirs, files in os.walk(work) for n in dirs + files if ".tmp-" in n]
    assert not leftovers
