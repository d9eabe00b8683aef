"""GSM8K evaluation against an independent scorer written here: the chain-of-thought prompt built from the format
documented in mindspeed_lora.evaluation.gsm8k, HF transformers' greedy generate on it, and the last number of the
text (before any "Question:") read with a regex of this file and compared as a number."""
import json
import os
import random
import re
from fractions import Fraction

import pytest
import torch

from mindspeed_lora.errors import UserError
from mindspeed_lora.evaluation.evaluator import EvalConfig, ExamScorer, evaluate, summarize
from mindspeed_lora.evaluation.gsm8k import gsm8k_files, gsm8k_prompt, load_gsm8k, parse_number
from mindspeed_lora.inference.generation import GenerationConfig
from mindspeed_lora.inference.prompting import stop_sequences
from tests.unit.test_evaluation import model, model_dir  # noqa: F401  (module fixtures: the tiny model)

NEW = 24
NAMES = ("Natalia", "Weng", "Betty", "James", "Tina")
THINGS = ("clips", "apples", "dollars", "pages", "eggs")


def _problem(r):
    """A GSM8K-shaped line: question, and a worked solution with calculator annotations ending in '#### N'."""
    a, b = r.randint(2, 60), r.randint(2, 60)
    name, thing = r.choice(NAMES), r.choice(THINGS)
    total = a + b
    question = f"{name} had {a} {thing} and got {b} more. How many {thing} does {name} have now?"
    answer = f"{name} has {a}+{b} = <<{a}+{b}={total}>>{total} {thing}.\n#### {total:,}"
    return {"question": question, "answer": answer}


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def make_gsm8k(root, n_test=4, n_train=3, seed=0):
    r = random.Random(seed)
    os.makedirs(root, exist_ok=True)
    write_jsonl(os.path.join(root, "test.jsonl"), [_problem(r) for _ in range(n_test)])
    if n_train:
        write_jsonl(os.path.join(root, "train.jsonl"), [_problem(r) for _ in range(n_train)])
    return root


def _lines(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def independent_prompt(question, examples):
    def solution(answer):
        steps, final = answer.split("####")
        return re.sub(r"<<.*?>>", "", steps).strip(), final.strip().replace(",", "")

    blocks = []
    for e in examples:
        steps, final = solution(e["answer"])
        blocks.append(f"Question: {e['question']}\nAnswer: {steps}\nThe answer is {final}.")
    return "\n\n".join(blocks + [f"Question: {question}\nAnswer:"])


def independent_number(text):
    found = re.findall(r"-?[0-9][0-9,]*(?:\.[0-9]+)?", text.split("Question:")[0])
    return Fraction(found[-1].replace(",", "")) if found else None


def hf_greedy(hf, tok, prompt, max_new_tokens=NEW):
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=tok.eos_token_id, pad_token_id=0)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


def test_generation_and_last_number_equal_independent_hf_scorer(model, tmp_path):  # noqa: F811
    hf, tok, engine = model
    root = make_gsm8k(str(tmp_path / "gsm8k"), n_test=4, n_train=3)
    test, train = _lines(os.path.join(root, "test.jsonl")), _lines(os.path.join(root, "train.jsonl"))
    texts = [hf_greedy(hf, tok, independent_prompt(q["question"], train[:2])) for q in test]
    numbers = [independent_number(t) for t in texts]
    # Make the model right where it wrote a number, so that accuracy is not trivially 0 (what it writes does not
    # depend on the answers: the examples come from train.jsonl); the gold written as 1,234.0 is the number 1234.
    for q, number in zip(test, numbers):
        if number is not None:
            q["answer"] = q["answer"].rsplit("####", 1)[0] + f"#### {float(number):,}"
    write_jsonl(os.path.join(root, "test.jsonl"), test)

    gen = GenerationConfig(max_new_tokens=NEW, stop_token_ids=(tok.eos_token_id,))
    cfg = EvalConfig(task="gsm8k", data_path=root, shots=2, max_new_tokens=NEW, batch_size=3)
    preds = evaluate(ExamScorer(engine, tok, cfg, generation=gen))
    assert cfg.method == "generate"
    assert [p.response for p in preds] == texts
    golds = [Fraction(q["answer"].rsplit("####", 1)[1].strip().replace(",", "")) for q in test]
    assert [Fraction(p.answer) for p in preds] == golds
    assert [Fraction(p.prediction) if p.prediction else None for p in preds] == numbers
    correct = sum(n == g for n, g in zip(numbers, golds))
    summary = summarize(preds, cfg, "test")
    assert summary["overall"] == {"correct": correct, "total": 4, "accuracy": correct / 4}
    assert 0 < correct < 4, "all right or all wrong: a weak comparison"


def test_generation_stops_where_the_model_starts_the_next_question(model, tmp_path):  # noqa: F811
    """What the scorer ignores after 'Question:' is not generated: a stop sequence ends exactly where
    'Question:' ends, however the text before it joins the word; only the gsm8k scorer adds them."""
    _, tok, engine = model
    seqs = stop_sequences(tok, "Question:")
    for text in ["The answer is 5.\n\nQuestion: Bob", "5\nQuestion: x", "so Question: y", "Question: z"]:
        ids = tok.encode(text, add_special_tokens=False)
        ends = [i for s in seqs for i in range(len(s), len(ids) + 1) if tuple(ids[i - len(s):i]) == s]
        assert ends and tok.decode(ids[:min(ends)]).endswith("Question:"), text
        assert "Question:" not in tok.decode(ids[:min(ends) - 1])
    gen = GenerationConfig(max_new_tokens=8, stop_token_ids=(tok.eos_token_id,))
    root = make_gsm8k(str(tmp_path / "gsm8k"))
    scorer = ExamScorer(engine, tok, EvalConfig(task="gsm8k", data_path=root), generation=gen)
    assert scorer.generation.stop_sequences == seqs and gen.stop_sequences == ()
    assert scorer.generation.stop_token_ids == gen.stop_token_ids


def test_exact_prompt_with_train_examples_or_the_file_itself(tmp_path):
    rows = [{"question": "Tom has 3 apples and buys 2,000 more. How many apples?",
             "answer": "Tom has 3+2000 = <<3+2000=2003>>2003 apples.\n#### 2,003"},
            {"question": "Ann reads 4 pages a day for 2 days. How many pages?",
             "answer": "She reads 4*2 = <<4*2=8>>8 pages.\n#### 8"},
            {"question": "What is 1 - 3?", "answer": "1 - 3 = -2\n#### -2"}]
    write_jsonl(tmp_path / "my_test.jsonl", rows)
    items = load_gsm8k(str(tmp_path), shots=1)
    assert [q.answer for q, _ in items] == ["2003", "8", "-2"]
    # no train.jsonl: the file's own first questions, never the one asked
    q, examples = items[0]
    assert [e.index for e in examples] == [1] and [e.index for e in items[2][1]] == [0]
    assert gsm8k_prompt(q, examples) == (
        "Question: Ann reads 4 pages a day for 2 days. How many pages?\n"
        "Answer: She reads 4*2 = 8 pages.\n"
        "The answer is 8.\n\n"
        "Question: Tom has 3 apples and buys 2,000 more. How many apples?\n"
        "Answer:")
    write_jsonl(tmp_path / "train.jsonl", rows[2:])
    q, examples = load_gsm8k(str(tmp_path), shots=5)[1]
    assert gsm8k_prompt(q, examples) == (
        "Question: What is 1 - 3?\nAnswer: 1 - 3 = -2\nThe answer is -2.\n\n"
        "Question: Ann reads 4 pages a day for 2 days. How many pages?\nAnswer:")


def test_parse_number_cases():
    assert parse_number("She has 5 apples, then 7. The answer is 12.") == "12"
    assert parse_number("The answer is $1,234.50") == "1234.5"
    assert parse_number("so 18.00 eggs") == "18"
    assert parse_number("The answer is -3.\n\nQuestion: Bob has 5 cats") == "-3"  # the invented next question
    assert parse_number("The answer is 7\nQuestion: 9") == "7"
    assert parse_number("no number here") == ""
    assert parse_number("Question: 4 + 4?") == ""
    assert parse_number("1,000,000 grains") == "1000000"
    assert parse_number("it costs .5 dollars") == "0.5"


def test_data_path_layouts(tmp_path):
    root = make_gsm8k(str(tmp_path / "a"), n_train=2)
    assert gsm8k_files(root) == (os.path.join(root, "test.jsonl"), os.path.join(root, "train.jsonl"))
    assert gsm8k_files(os.path.join(root, "test.jsonl")) == (os.path.join(root, "test.jsonl"),
                                                              os.path.join(root, "train.jsonl"))
    assert gsm8k_files(os.path.join(root, "train.jsonl")) == (os.path.join(root, "train.jsonl"), None)
    one = make_gsm8k(str(tmp_path / "b"), n_train=0)
    os.rename(os.path.join(one, "test.jsonl"), os.path.join(one, "gsm8k_test.jsonl"))
    assert gsm8k_files(one) == (os.path.join(one, "gsm8k_test.jsonl"), None)
    cfg = EvalConfig(task="gsm8k", data_path=one)
    assert (cfg.method, cfg.max_new_tokens, cfg.shots) == ("generate", 256, 5)


def test_bad_data_names_file_line_and_key(tmp_path):
    with pytest.raises(UserError, match="no .jsonl file to score"):
        gsm8k_files(str(tmp_path))
    with pytest.raises(UserError, match="no such file or directory"):
        gsm8k_files(str(tmp_path / "nope"))
    write_jsonl(tmp_path / "a.jsonl", [])
    write_jsonl(tmp_path / "b.jsonl", [])
    with pytest.raises(UserError, match=r"several .jsonl files \['a.jsonl', 'b.jsonl'\] and none named test.jsonl"):
        gsm8k_files(str(tmp_path))
    with pytest.raises(UserError, match="a.jsonl: no questions"):
        load_gsm8k(str(tmp_path / "a.jsonl"), 0)
    bad = tmp_path / "test.jsonl"
    good = {"question": "q", "answer": "1+1=2\n#### 2"}
    cases = [
        ({"question": "q", "answer": "it is 2"}, r"test.jsonl:2: answer has no '####'; expected GSM8K's worked "
                                                 r"solution ending in '#### <number>'"),
        ({"question": "q", "answer": "so\n#### two"}, r"test.jsonl:2: answer ends in '#### two'; expected a number"),
        ({"question": "q"}, r"test.jsonl:2: expected an object with question and answer \(strings\); keys "
                            r"\['question'\]"),
    ]
    for line, message in cases:
        write_jsonl(bad, [good, line])
        with pytest.raises(UserError, match=message):
            load_gsm8k(str(tmp_path), 0)
    bad.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(UserError, match=r"test.jsonl:2: not valid JSON"):
        load_gsm8k(str(tmp_path), 0)
    write_jsonl(bad, [good])
    write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": "4"}])
    with pytest.raises(UserError, match=r"train.jsonl:1: answer has no '####'"):
        load_gsm8k(str(tmp_path), 1)
