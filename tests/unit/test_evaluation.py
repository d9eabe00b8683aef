"""MMLU-layout evaluation against an independent scorer written here with the HF model.

The independent scorer builds each prompt from the format documented in mindspeed_lora.evaluation.mmlu, runs
HF transformers on it one question at a time, and picks the letter whose continuation (" A", ..., or "A" in
Chinese) has the highest total log-probability; accuracy is tallied here per subject.
"""
import csv
import json
import os
import random
import re

import pytest
import torch

from mindspeed_lora import tiny
from mindspeed_lora.errors import UserError
from mindspeed_lora.evaluation.evaluator import EvalConfig, ExamScorer, evaluate, format_table, summarize
from mindspeed_lora.evaluation.mmlu import read_subject_file, resolve_exam_dir
from mindspeed_lora.inference.generation import GenerationConfig
from mindspeed_lora.inference.model import ModelSource, build_inference_engine
from mindspeed_lora.parallel import initialize
from tests.unit.test_inference import build_lively_model

WORDS = ("the quick brown fox jumps over lazy dog capital of France is Paris answer number one two three "
         "health sleep exercise translate summarize text").split()
ZH = list("中国的首都是北京今天天气很好我们一起学习吧你好人工智能助手")


def _text(r, n, zh=False):
    return ("" if zh else " ").join(r.choice(ZH if zh else WORDS) for _ in range(n))


def make_exam(root, subjects=("abstract_algebra", "world_history", "virology"), n_test=6, n_dev=5,
              style="mmlu", seed=0):
    """Write a synthetic exam: mmlu style (no header, test split) or ceval style (header, val split, Chinese)."""
    r = random.Random(seed)
    zh = style == "ceval"
    scored = "val" if zh else "test"
    for subject in subjects:
        for split, n in (("dev", n_dev), (scored, n_test)):
            os.makedirs(os.path.join(root, split), exist_ok=True)
            with open(os.path.join(root, split, f"{subject}_{split}.csv"), "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                if zh:
                    w.writerow(["id", "question", "A", "B", "C", "D", "answer", "explanation"])
                for i in range(n):
                    row = [_text(r, 6, zh) + ("？" if zh else "?")] + [_text(r, 2, zh) for _ in range(4)]
                    row.append(r.choice("ABCD"))
                    w.writerow([i] + row + ["because"] if zh else row)
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    initialize(1, 1, seed=5)
    path = str(tmp_path_factory.mktemp("qwen3_eval"))
    hf = build_lively_model("qwen3", path, seed=14, max_position_embeddings=1024)  # 5-shot prompts are long
    tok = tiny.build_tokenizer(path)
    return path, hf, tok


@pytest.fixture(scope="module")
def model(model_dir):
    path, hf, tok = model_dir
    engine, _ = build_inference_engine(ModelSource(load=path), tp_rank=0)
    return hf, tok, engine


def _independent_prompt(rows_dev, row, subject, zh):
    def block(q, answer):
        lines = [q[0]] + [f"{letter}. {c}" for letter, c in zip("ABCD", q[1:5])]
        cue = "答案：" if zh else "Answer:"
        lines.append(cue + ((answer if zh else " " + answer) if answer else ""))
        return "\n".join(lines)

    name = subject.replace("_", " ")
    head = (f"以下是关于{name}的单项选择题，请直接给出正确答案的选项。\n\n" if zh
            else f"The following are multiple choice questions (with answers) about {name}.\n\n")
    return head + "\n\n".join([block(d, d[5]) for d in rows_dev] + [block(row, None)])


def _read_csv(path, header):
    with open(path, encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return [r[1:7] for r in rows[1:]] if header else rows


def independent_accuracy(hf, tok, root, split, zh, shots=5, limit=None):
    results = {}
    for fname in sorted(os.listdir(os.path.join(root, split))):
        subject = fname[: -len(f"_{split}.csv")]
        dev = _read_csv(os.path.join(root, "dev", f"{subject}_dev.csv"), zh)[:shots]
        rows = _read_csv(os.path.join(root, split, fname), zh)[:limit]
        correct, letters = 0, []
        for row in rows:
            prompt = tok(_independent_prompt(dev, row, subject, zh), add_special_tokens=False)["input_ids"]
            scores = []
            for letter in "ABCD":
                cont = tok(letter if zh else " " + letter, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([prompt + cont])
                with torch.no_grad():
                    logp = torch.log_softmax(hf(ids).logits[0].float(), -1)
                scores.append(sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(cont)))
            pick = "ABCD"[max(range(4), key=scores.__getitem__)]
            letters.append(pick)
            correct += pick == row[5]
        results[subject] = (correct, len(rows), letters)
    return results


@pytest.mark.parametrize("style", ["mmlu", "ceval"])
def test_logit_accuracy_equals_independent_hf_scorer(model, tmp_path, style):
    hf, tok, engine = model
    root = make_exam(str(tmp_path / style), style=style)
    task = "ceval" if style == "ceval" else "mmlu"
    cfg = EvalConfig(task=task, data_path=root, batch_size=4)
    preds = evaluate(ExamScorer(engine, tok, cfg))
    summary = summarize(preds, cfg, "val" if task == "ceval" else "test")
    ref = independent_accuracy(hf, tok, root, "val" if task == "ceval" else "test", zh=task == "ceval")
    for subject, (correct, total, letters) in ref.items():
        assert summary["subjects"][subject]["correct"] == correct
        assert summary["subjects"][subject]["total"] == total
        assert [p.prediction for p in preds if p.subject == subject] == letters
    assert summary["overall"]["correct"] == sum(c for c, _, _ in ref.values())
    assert len({p.prediction for p in preds}) > 1, "one letter for every question: a weak comparison"
    table = format_table(summary)
    assert "overall" in table and all(s in table for s in ref)


def test_max_eval_samples_and_split_dir_as_data_path(model, tmp_path):
    hf, tok, engine = model
    root = make_exam(str(tmp_path / "exam"), n_test=5)
    cfg = EvalConfig(task="mmlu", data_path=os.path.join(root, "test"), max_eval_samples=2, shots=3)
    preds = evaluate(ExamScorer(engine, tok, cfg))
    ref = independent_accuracy(hf, tok, root, "test", zh=False, shots=3, limit=2)
    assert len(preds) == 2 * len(ref)
    for subject, (_, _, letters) in ref.items():
        assert [p.prediction for p in preds if p.subject == subject] == letters


def test_prompts_longer_than_seq_length_are_cut_and_counted(model_dir, tmp_path):
    path, _, tok = model_dir
    engine, _ = build_inference_engine(ModelSource(load=path, seq_length=200), tp_rank=0)
    root = make_exam(str(tmp_path / "exam"), subjects=("virology",), n_test=4)
    cfg = EvalConfig(task="mmlu", data_path=root)
    preds = evaluate(ExamScorer(engine, tok, cfg))
    dev = _read_csv(os.path.join(root, "dev", "virology_dev.csv"), False)
    lengths = [len(tok(_independent_prompt(dev, row, "virology", False))["input_ids"])
               for row in _read_csv(os.path.join(root, "test", "virology_test.csv"), False)]
    assert [p.truncated for p in preds] == [n > 200 for n in lengths]
    assert summarize(preds, cfg, "test")["truncated_prompts"] == sum(n > 200 for n in lengths) > 0


def test_generation_scoring_equals_hf_greedy_and_regex(model, tmp_path):
    hf, tok, engine = model
    root = make_exam(str(tmp_path / "gen"), subjects=("virology",), n_test=4)
    gen = GenerationConfig(max_new_tokens=6, stop_token_ids=(tok.eos_token_id,))
    cfg = EvalConfig(task="mmlu", data_path=root, method="generate", max_new_tokens=6, shots=2)
    preds = evaluate(ExamScorer(engine, tok, cfg, generation=gen))
    dev = _read_csv(os.path.join(root, "dev", "virology_dev.csv"), False)[:2]
    for p, row in zip(preds, _read_csv(os.path.join(root, "test", "virology_test.csv"), False)):
        ids = tok(_independent_prompt(dev, row, "virology", False), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                              eos_token_id=tok.eos_token_id, pad_token_id=0)
        text = tok.decode(out[0, len(ids):], skip_special_tokens=True)
        m = re.search(r"(?<![A-Za-z])([ABCD])(?![A-Za-z])", text)
        assert p.prediction == (m.group(1) if m else "")


def test_parse_letter():
    from mindspeed_lora.evaluation.evaluator import parse_letter

    assert parse_letter(" B. because") == "B"
    assert parse_letter("答案是C。") == "C"
    assert parse_letter("About Dogs: D") == "D"  # capitals inside words are not answers
    assert parse_letter("none") == ""


# ---- bad input -------------------------------------------------------------------------------------------------

def test_data_dir_not_in_layout(tmp_path):
    (tmp_path / "questions").mkdir()
    (tmp_path / "questions" / "x.csv").write_text("q,a,b,c,d,A\n")
    with pytest.raises(UserError, match=r"MMLU CSV layout .*found directories \['questions'\]"):
        resolve_exam_dir(str(tmp_path), "mmlu")
    with pytest.raises(UserError, match="no such directory"):
        resolve_exam_dir(str(tmp_path / "nope"), "mmlu")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "notes.txt").write_text("")
    with pytest.raises(UserError, match=r"no files named <subject>_test.csv"):
        resolve_exam_dir(str(tmp_path), "mmlu")
    with pytest.raises(UserError, match="'test' split but --eval-split is 'val'"):
        resolve_exam_dir(str(tmp_path / "test"), "mmlu", "val")


def test_missing_dev_file_is_named(model, tmp_path):
    _, tok, engine = model
    root = make_exam(str(tmp_path / "exam"), subjects=("virology",))
    os.remove(os.path.join(root, "dev", "virology_dev.csv"))
    with pytest.raises(UserError, match=r"virology_dev.csv: missing; 5-shot"):
        evaluate(ExamScorer(engine, tok, EvalConfig(task="mmlu", data_path=root)))


def test_bad_rows_name_file_and_line(tmp_path):
    p = tmp_path / "x_test.csv"
    p.write_text("q1,a,b,c,d,A\nq2,a,b,c,d,E\n")
    with pytest.raises(UserError, match=r"x_test.csv:2: answer 'E'; expected one of A, B, C, D"):
        read_subject_file(str(p), "x")
    p.write_text("q1,a,b,c,d,A\nq2,a,b\n")
    with pytest.raises(UserError, match=r"x_test.csv:2: 3 columns; expected question,A,B,C,D,answer"):
        read_subject_file(str(p), "x")
    p.write_text("id,question,A,B,C,D,answer\n1,q,a,b,c,d,\n")
    with pytest.raises(UserError, match=r"x_test.csv:2: answer ''.*C-Eval's test split has no answers"):
        read_subject_file(str(p), "x")
    p.write_text("")
    with pytest.raises(UserError, match="empty file"):
        read_subject_file(str(p), "x")
    p.write_bytes(b"q,\xff\xfe,b,c,d,A\n")
    with pytest.raises(UserError, match="not UTF-8"):
        read_subject_file(str(p), "x")


def test_bad_config_values():
    with pytest.raises(UserError, match="--task 'gsm8k'"):
        EvalConfig(task="gsm8k", data_path=".")
    with pytest.raises(UserError, match="--max-eval-samples=0"):
        EvalConfig(task="mmlu", data_path=".", max_eval_samples=0)


# --------------------------------------------------------------------------------------------- BoolQ

def make_boolq(root, n=16, seed=0):
    """Two .jsonl files: BoolQ's keys (answer true/false) and SuperGLUE's (label 1/0, question ending in ?)."""
    r = random.Random(seed)
    os.makedirs(root, exist_ok=True)
    for name, superglue in (("dev", False), ("val", True)):
        with open(os.path.join(root, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for _ in range(n // 2):
                yes = r.random() < 0.5
                q = _text(r, 5) + ("?" if superglue else "")
                obj = {"question": q, "passage": _text(r, 12), **({"label": int(yes)} if superglue else
                                                                  {"answer": yes})}
                f.write(json.dumps(obj) + "\n")
    return root


def independent_boolq(hf, tok, root, chat_prefix=" "):
    """Per question: the first tokens where " yes" and " no" differ, compared after prompt + common tokens."""
    yes, no = (tok(chat_prefix + w, add_special_tokens=False)["input_ids"] for w in ("yes", "no"))
    common = next(i for i, (a, b) in enumerate(zip(yes, no)) if a != b)
    picks, answers = [], []
    for name in sorted(f for f in os.listdir(root) if f.endswith(".jsonl")):
        for line in open(os.path.join(root, name), encoding="utf-8"):
            obj = json.loads(line)
            q = obj["question"] if obj["question"].endswith("?") else obj["question"] + "?"
            text = f"{obj['passage']}\nQuestion: {q}\nAnswer:"
            ids = tok(text, add_special_tokens=False)["input_ids"] + yes[:common]
            with torch.no_grad():
                logits = hf(torch.tensor([ids])).logits[0, -1]
            picks.append("yes" if logits[yes[common]] > logits[no[common]] else "no")
            answers.append("yes" if obj.get("answer", obj.get("label")) in (True, 1) else "no")
    return picks, answers


def test_boolq_logit_scoring_equals_independent_hf_scorer(model, tmp_path):
    hf, tok, engine = model
    root = make_boolq(str(tmp_path / "boolq"))
    cfg = EvalConfig(task="boolq", data_path=root, batch_size=3)
    preds = evaluate(ExamScorer(engine, tok, cfg))
    picks, answers = independent_boolq(hf, tok, root)
    assert [p.prediction for p in preds] == picks and [p.answer for p in preds] == answers
    assert len(set(picks)) == 2, "one answer for every question: a weak comparison"
    summary = summarize(preds, cfg, "dev+val")
    assert summary["overall"]["correct"] == sum(a == b for a, b in zip(picks, answers))
    assert summary["shots"] == 0 and list(summary["subjects"]) == ["boolq"]
    one_file = evaluate(ExamScorer(engine, tok, EvalConfig(task="boolq", data_path=os.path.join(root, "val.jsonl"),
                                                           max_eval_samples=3)))
    assert [p.prediction for p in one_file] == picks[8:11]


def test_boolq_generation_scoring_equals_hf_greedy(model, tmp_path):
    hf, tok, engine = model
    root = make_boolq(str(tmp_path / "boolq"), n=4, seed=3)
    gen = GenerationConfig(max_new_tokens=5, stop_token_ids=(tok.eos_token_id,))
    preds = evaluate(ExamScorer(engine, tok, EvalConfig(task="boolq", data_path=root, method="generate",
                                                        max_new_tokens=5), generation=gen))
    lines = [json.loads(x) for f in ("dev.jsonl", "val.jsonl") for x in open(os.path.join(root, f))]
    for p, obj in zip(preds, lines):
        q = obj["question"] if obj["question"].endswith("?") else obj["question"] + "?"
        ids = tok(f"{obj['passage']}\nQuestion: {q}\nAnswer:", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False, eos_token_id=tok.eos_token_id,
                              pad_token_id=0)
        m = re.search(r"\b(yes|no)\b", tok.decode(out[0, len(ids):], skip_special_tokens=True), re.IGNORECASE)
        assert p.prediction == (m.group(1).lower() if m else "")


def test_boolq_bad_data_names_file_and_line(tmp_path):
    from mindspeed_lora.evaluation.boolq import load_boolq, parse_yes_no

    with pytest.raises(UserError, match="no .jsonl files"):
        load_boolq(str(tmp_path))
    bad = tmp_path / "dev.jsonl"
    bad.write_text('{"question": "q", "passage": "p", "answer": true}\n{"question": "q", "answer": true}\n')
    with pytest.raises(UserError, match=r"dev.jsonl:2: expected an object with question, passage and answer"):
        load_boolq(str(tmp_path))
    bad.write_text('{"question": "q", "passage": "p", "answer": "maybe"}\n')
    with pytest.raises(UserError, match=r"dev.jsonl:1: answer 'maybe'; expected true or false"):
        load_boolq(str(tmp_path))
    bad.write_text('{"question": "q", "passage": "p", "answer": true}\nnot json\n')
    with pytest.raises(UserError, match=r"dev.jsonl:2: not valid JSON"):
        load_boolq(str(tmp_path))
    assert [parse_yes_no(t) for t in (" Yes, it is", "no.", "maybe", "yesterday no")] == ["yes", "no", "", "no"]
