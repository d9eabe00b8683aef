"""Exam evaluation (MMLU, C-Eval, CMMLU; BoolQ) against an independent scorer written here with the HF model.

The independent scorer builds each prompt from the exams' official formats as written out here (C-Eval's
answer-only prompt from its tutorial, CMMLU's from its src/mp_utils.py, MMLU's from its paper's code), runs HF
transformers on it one question at a time, and picks the letter whose continuation (" A", ..., or "A" in Chinese)
has the highest total log-probability; accuracy is tallied here per subject.
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
SCORED = {"mmlu": "test", "ceval": "val", "cmmlu": "test"}
SUBJECTS = {"mmlu": ("abstract_algebra", "world_history", "virology"),
            "ceval": ("computer_network", "high_school_physics", "my_subject"),
            "cmmlu": ("agronomy", "high_school_physics")}
# The official Chinese subject names of the subjects above (C-Eval's subject_mapping.json, CMMLU's name_en2zh);
# "my_subject" is in neither, so it is named by its file.
ZH_NAMES = {"ceval": {"computer_network": "计算机网络", "high_school_physics": "高中物理"},
            "cmmlu": {"agronomy": "农学", "high_school_physics": "高中物理学"}}


def _text(r, n, zh=False):
    return ("" if zh else " ").join(r.choice(ZH if zh else WORDS) for _ in range(n))


def exam_file(root, style, subject, split):
    """MMLU and C-Eval name files <subject>_<split>.csv, CMMLU <subject>.csv."""
    return os.path.join(root, split, f"{subject}.csv" if style == "cmmlu" else f"{subject}_{split}.csv")


def make_exam(root, subjects=None, n_test=6, n_dev=5, style="mmlu", seed=0):
    """Write a synthetic exam as each one is released: mmlu (no header, test split), ceval (header
    id,question,A,B,C,D,answer[,explanation] with the explanation in dev only, val split, Chinese) or cmmlu (header
    ,Question,A,B,C,D,Answer with an unnamed index column, files named by subject only, test split, Chinese)."""
    r = random.Random(seed)
    zh = style != "mmlu"
    for subject in subjects or SUBJECTS[style]:
        for split, n in (("dev", n_dev), (SCORED[style], n_test)):
            os.makedirs(os.path.join(root, split), exist_ok=True)
            with open(exam_file(root, style, subject, split), "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                explain = style == "ceval" and split == "dev"
                if style == "ceval":
                    w.writerow(["id", "question", "A", "B", "C", "D", "answer"] + ["explanation"] * explain)
                elif style == "cmmlu":
                    w.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
                for i in range(n):
                    row = [_text(r, 6, zh) + ("？" if zh else "?")] + [_text(r, 2, zh) for _ in range(4)]
                    row.append(r.choice("ABCD"))
                    w.writerow(row if style == "mmlu" else [i] + row + ["因为"] * explain)
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


def _independent_prompt(rows_dev, row, subject, style):
    """The official answer-only prompt of each exam, written out independently of mindspeed_lora."""
    prefix, cue, space = {"mmlu": ("", "Answer:", " "), "ceval": ("", "答案：", ""),
                          "cmmlu": ("题目：", "答案是：", "")}[style]

    def block(q, answer):
        lines = [prefix + q[0]] + [f"{letter}. {c}" for letter, c in zip("ABCD", q[1:5])]
        return "\n".join(lines + [cue + (space + answer if answer else "")])

    name = ZH_NAMES.get(style, {}).get(subject, subject.replace("_", " "))
    head = {"mmlu": f"The following are multiple choice questions (with answers) about {name}.\n\n",
            "ceval": f"以下是中国关于{name}考试的单项选择题，请选出其中的正确答案。\n\n",
            "cmmlu": f"以下是关于{name}的单项选择题，请直接给出正确答案的选项。\n\n"}[style]
    return head + "\n\n".join([block(d, d[5]) for d in rows_dev] + [block(row, None)])


def _read_csv(path, header):
    with open(path, encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return [r[1:7] for r in rows[1:]] if header else rows


def independent_accuracy(hf, tok, root, style, shots=5, limit=None):
    results = {}
    split, header = SCORED[style], style != "mmlu"
    for fname in sorted(os.listdir(os.path.join(root, split))):
        subject = fname[: -len(".csv")].removesuffix(f"_{split}")
        dev = _read_csv(exam_file(root, style, subject, "dev"), header)[:shots]
        rows = _read_csv(os.path.join(root, split, fname), header)[:limit]
        correct, letters = 0, []
        for row in rows:
            prompt = tok(_independent_prompt(dev, row, subject, style), add_special_tokens=False)["input_ids"]
            scores = []
            for letter in "ABCD":
                cont = tok(letter if header else " " + letter, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([prompt + cont])
                with torch.no_grad():
                    logp = torch.log_softmax(hf(ids).logits[0].float(), -1)
                scores.append(sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(cont)))
            pick = "ABCD"[max(range(4), key=scores.__getitem__)]
            letters.append(pick)
            correct += pick == row[5]
        results[subject] = (correct, len(rows), letters)
    return results


@pytest.mark.parametrize("style", ["mmlu", "ceval", "cmmlu"])
def test_logit_accuracy_equals_independent_hf_scorer(model, tmp_path, style):
    hf, tok, engine = model
    root = make_exam(str(tmp_path / style), style=style)
    cfg = EvalConfig(task=style, data_path=root, batch_size=4)
    preds = evaluate(ExamScorer(engine, tok, cfg))
    summary = summarize(preds, cfg, SCORED[style])
    ref = independent_accuracy(hf, tok, root, style)
    assert sorted(ref) == sorted(SUBJECTS[style])
    for subject, (correct, total, letters) in ref.items():
        assert summary["subjects"][subject]["correct"] == correct
        assert summary["subjects"][subject]["total"] == total
        assert [p.prediction for p in preds if p.subject == subject] == letters
    assert summary["overall"]["correct"] == sum(c for c, _, _ in ref.values())
    assert len({p.prediction for p in preds}) > 1, "one letter for every question: a weak comparison"
    table = format_table(summary)
    assert "overall" in table and all(s in table for s in ref)


def _one_question_exam(root, style, subject, dev_row, scored_row):
    """An exam of one subject with one dev example and one scored question, as ``style`` lays it out."""
    header = {"ceval": ["id", "question", "A", "B", "C", "D", "answer"],
              "cmmlu": ["", "Question", "A", "B", "C", "D", "Answer"]}[style]
    for split, row in (("dev", dev_row), (SCORED[style], scored_row)):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        with open(exam_file(root, style, subject, split), "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([header, [0, *row]])
    return root


def test_exact_prompt_text_of_ceval_and_cmmlu(model, tmp_path):
    _, tok, engine = model
    dev = ["网络的作用是____。", "传输", "存储", "计算", "显示", "A"]
    q = ["路由器工作在哪一层？", "物理层", "网络层", "应用层", "会话层", "B"]

    def prompt(style, subject, **kw):
        root = _one_question_exam(str(tmp_path / f"{style}_{subject}"), style, subject, dev, q)
        scorer = ExamScorer(engine, tok, EvalConfig(task=style, data_path=root, shots=1, **kw))
        [(question, examples)] = scorer.task.load(scorer.cfg)[subject]
        return scorer.prompt_text(question, examples)

    assert prompt("ceval", "computer_network") == (
        "以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n"
        "网络的作用是____。\nA. 传输\nB. 存储\nC. 计算\nD. 显示\n答案：A\n\n"
        "路由器工作在哪一层？\nA. 物理层\nB. 网络层\nC. 应用层\nD. 会话层\n答案：")
    assert prompt("cmmlu", "computer_science") == (
        "以下是关于计算机科学的单项选择题，请直接给出正确答案的选项。\n\n"
        "题目：网络的作用是____。\nA. 传输\nB. 存储\nC. 计算\nD. 显示\n答案是：A\n\n"
        "题目：路由器工作在哪一层？\nA. 物理层\nB. 网络层\nC. 应用层\nD. 会话层\n答案是：")
    # a subject outside the official table is named by its file; --eval-language en gives MMLU's format
    assert prompt("ceval", "router_basics").startswith("以下是中国关于router basics考试的单项选择题")
    assert prompt("cmmlu", "computer_science", language="en") == (
        "The following are multiple choice questions (with answers) about computer science.\n\n"
        "网络的作用是____。\nA. 传输\nB. 存储\nC. 计算\nD. 显示\nAnswer: A\n\n"
        "路由器工作在哪一层？\nA. 物理层\nB. 网络层\nC. 应用层\nD. 会话层\nAnswer:")


def test_max_eval_samples_and_split_dir_as_data_path(model, tmp_path):
    hf, tok, engine = model
    root = make_exam(str(tmp_path / "exam"), n_test=5)
    cfg = EvalConfig(task="mmlu", data_path=os.path.join(root, "test"), max_eval_samples=2, shots=3)
    preds = evaluate(ExamScorer(engine, tok, cfg))
    ref = independent_accuracy(hf, tok, root, "mmlu", shots=3, limit=2)
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
    lengths = [len(tok(_independent_prompt(dev, row, "virology", "mmlu"))["input_ids"])
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
        ids = tok(_independent_prompt(dev, row, "virology", "mmlu"), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                              eos_token_id=tok.eos_token_id, pad_token_id=0)
        text = tok.decode(out[0, len(ids):], skip_special_tokens=True)
        m = re.search(r"(?<![A-Za-z])([ABCD])(?![A-Za-z])", text)
        assert p.response == text and p.prediction == (m.group(1) if m else "")


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
    with pytest.raises(UserError, match=r"exam CSV layout .*found directories \['questions'\]"):
        resolve_exam_dir(str(tmp_path), "mmlu")
    with pytest.raises(UserError, match="no such directory"):
        resolve_exam_dir(str(tmp_path / "nope"), "mmlu")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "notes.txt").write_text("")
    with pytest.raises(UserError, match=r"test: no .csv files; expected one per subject, <subject>_test.csv "
                                        r"\(MMLU, C-Eval\) or <subject>.csv \(CMMLU\)"):
        resolve_exam_dir(str(tmp_path), "cmmlu")
    with pytest.raises(UserError, match="'test' split but --eval-split is 'val'"):
        resolve_exam_dir(str(tmp_path / "test"), "mmlu", "val")
    (tmp_path / "test" / "law.csv").write_text("")
    (tmp_path / "test" / "law_test.csv").write_text("")
    with pytest.raises(UserError, match="law.csv and law_test.csv are both subject 'law'"):
        resolve_exam_dir(str(tmp_path), "mmlu")


@pytest.mark.parametrize("style, dev_name", [("mmlu", "virology_dev.csv"), ("cmmlu", "agronomy.csv")])
def test_missing_dev_file_is_named(model, tmp_path, style, dev_name):
    _, tok, engine = model
    root = make_exam(str(tmp_path / "exam"), subjects=(dev_name.split("_")[0].removesuffix(".csv"),), style=style)
    os.remove(os.path.join(root, "dev", dev_name))
    with pytest.raises(UserError, match=rf"dev/{dev_name}: missing; 5-shot"):
        evaluate(ExamScorer(engine, tok, EvalConfig(task=style, data_path=root)))


def test_bad_rows_name_file_line_and_column(tmp_path):
    p = tmp_path / "x_test.csv"
    p.write_text("q1,a,b,c,d,A\nq2,a,b,c,d,E\n")
    with pytest.raises(UserError, match=r"x_test.csv:2: answer 'E' in column 6; expected one of A, B, C, D"):
        read_subject_file(str(p), "x")
    # a quoted question over two lines: the next row starts on line 4 (C-Eval's and CMMLU's files have such cells)
    p.write_text(',Question,A,B,C,D,Answer\n0,"two\nlines",a,b,c,d,A\n1,q,a,b,c,d,AB\n')
    with pytest.raises(UserError, match=r"x_test.csv:4: answer 'AB' in column 7; expected one of A, B, C, D"):
        read_subject_file(str(p), "x")
    p.write_text("q1,a,b,c,d,A\nq2,a,b\n")
    with pytest.raises(UserError, match=r"x_test.csv:2: 3 columns; expected question,A,B,C,D,answer"):
        read_subject_file(str(p), "x")
    p.write_text("id,question,A,B,C,D\n1,q,a,b,c,d\n")  # C-Eval's test split
    with pytest.raises(UserError, match=r"x_test.csv:1: the header .* has no column answer; expected question, A, "
                                        r"B, C, D and answer \(C-Eval's test split has no answers"):
        read_subject_file(str(p), "x")
    p.write_text(",Question,A,B,C,Answer\n0,q,a,b,c,A\n")
    with pytest.raises(UserError, match=r"x_test.csv:1: the header .* has no column D; expected"):
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
    from mindspeed_lora.arguments.inference import EVAL_TASKS
    from mindspeed_lora.evaluation.evaluator import TASKS

    assert set(EVAL_TASKS) == set(TASKS)  # the --task choices are the tasks the evaluator has
    with pytest.raises(UserError, match="--task 'bbh'"):
        EvalConfig(task="bbh", data_path=".")
    with pytest.raises(UserError, match="--max-eval-samples=0"):
        EvalConfig(task="mmlu", data_path=".", max_eval_samples=0)
    with pytest.raises(UserError, match="--max-new-tokens=0"):
        EvalConfig(task="mmlu", data_path=".", max_new_tokens=0)


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
