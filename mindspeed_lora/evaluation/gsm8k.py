"""GSM8K (``--task gsm8k``): grade-school math word problems, answered by greedy chain-of-thought generation.

``--task-data-path`` is a ``.jsonl`` file, or a directory holding ``test.jsonl`` (or a single other ``.jsonl``
besides ``train.jsonl``), as GSM8K is released and as MindSpeed-LLM's scripts point at it. Each line is an object
with ``question`` and ``answer``; the answer is a worked solution whose last line is ``#### <number>``.

Few-shot examples (``--num-shots k``): the first k questions of ``train.jsonl`` beside the scored file when there
is one; otherwise the scored file's own first k questions, leaving out the one being asked (so every question is
scored, and never shown its own answer). An example's solution loses GSM8K's calculator annotations
(``<<48/2=24>>``) and ends with the sentence that the model learns to end with::

    Question: <question>
    Answer: <solution>
    The answer is <number>.

    ...                         <- k example blocks, separated by a blank line
    Question: <question>
    Answer:                     <- the model continues

Scoring: greedy generation, which stops once a row writes ``Question:`` (a raw model goes on to invent the next
question); the text is cut there, and the prediction is the last number left in it, commas removed, compared
with the ``####`` number as a number (``18.00`` is ``18``).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from mindspeed_lora.errors import UserError
from mindspeed_lora.jsonl import iter_json_objects

SUBJECT = "gsm8k"
TRAIN_FILE = "train.jsonl"
_NUMBER = re.compile(r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")
_CALCULATOR = re.compile(r"<<[^>]*>>")
NEXT_QUESTION = "Question:"


@dataclass(frozen=True)
class MathQuestion:
    subject: str
    index: int
    """Line order in its file (0-based, blank lines skipped)."""
    question: str
    solution: str
    """The worked solution without its ``####`` line and calculator annotations."""
    answer: str
    """The ``####`` number in canonical form (``canonical_number``)."""


def canonical_number(text: str) -> str:
    """``text`` (a number, possibly with commas) written one way per value: "1,200.50" -> "1200.5", "18.0" -> "18";
    "" when it is not a number."""
    try:
        value = Decimal(text.replace(",", ""))
    except InvalidOperation:
        return ""
    if not value.is_finite():
        return ""
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def parse_number(text: str) -> str:
    """The prediction in a generation: the last number before any ``Question:``, canonical; "" when none."""
    numbers = _NUMBER.findall(text.split(NEXT_QUESTION, 1)[0])
    return canonical_number(numbers[-1]) if numbers else ""


def gsm8k_files(path: str) -> tuple[str, str | None]:
    """(the scored file, ``train.jsonl`` beside it or None)."""
    if os.path.isfile(path):
        scored = path
    elif os.path.isdir(path):
        names = sorted(f for f in os.listdir(path) if f.endswith(".jsonl"))
        others = [f for f in names if f != TRAIN_FILE]
        if "test.jsonl" in names:
            scored = os.path.join(path, "test.jsonl")
        elif len(others) == 1:
            scored = os.path.join(path, others[0])
        elif not others:
            raise UserError(f"--task-data-path {path}: no .jsonl file to score (GSM8K's layout: test.jsonl, one "
                            "object per line with question and an answer ending in '#### <number>')")
        else:
            raise UserError(f"--task-data-path {path}: several .jsonl files {others} and none named test.jsonl; "
                            "give the file to score")
    else:
        raise UserError(f"--task-data-path {path}: no such file or directory")
    train = os.path.join(os.path.dirname(os.path.abspath(scored)), TRAIN_FILE)
    if not os.path.isfile(train) or os.path.samefile(train, scored):
        return scored, None
    return scored, train


def read_gsm8k(path: str) -> list[MathQuestion]:
    out = []
    for where, obj in iter_json_objects(path):
        if not isinstance(obj.get("question"), str) or not isinstance(obj.get("answer"), str):
            raise UserError(f"{where}: expected an object with question and answer (strings); keys {sorted(obj)}")
        solution, sep, final = obj["answer"].rpartition("####")
        if not sep:
            raise UserError(f"{where}: answer has no '####'; expected GSM8K's worked solution ending in "
                            "'#### <number>'")
        final = final.strip()
        number = canonical_number(final) if _NUMBER.fullmatch(final) else ""
        if not number:
            raise UserError(f"{where}: answer ends in '#### {final}'; expected a number after '####'")
        out.append(MathQuestion(SUBJECT, len(out), obj["question"].strip(), _CALCULATOR.sub("", solution).strip(),
                                number))
    if not out:
        raise UserError(f"{path}: no questions")
    return out


def load_gsm8k(path: str, shots: int) -> list[tuple[MathQuestion, list[MathQuestion]]]:
    """(question, its few-shot examples) for every question of the scored file."""
    scored_file, train_file = gsm8k_files(path)
    questions = read_gsm8k(scored_file)
    if shots == 0:
        return [(q, []) for q in questions]
    if train_file is not None:
        examples = read_gsm8k(train_file)[:shots]
        return [(q, examples) for q in questions]
    head = questions[: shots + 1]
    return [(q, [e for e in head if e.index != q.index][:shots]) for q in questions]


def gsm8k_prompt(q: MathQuestion, examples: list[MathQuestion]) -> str:
    blocks = [f"Question: {e.question}\nAnswer: {e.solution}\nThe answer is {e.answer}." for e in examples]
    return "\n\n".join(blocks + [f"Question: {q.question}\nAnswer:"])
