"""BoolQ (``--task boolq``): yes/no questions about a passage, read from JSON lines, asked zero-shot.

``--task-data-path`` is a ``.jsonl`` file or a directory of them (BoolQ's ``dev.jsonl``, as MindSpeed-LLM's
scripts point at). Each line is an object with ``question``, ``passage`` and ``answer`` (true / false;
SuperGLUE's ``label``, 1 / 0 or true / false, is read too). Prompt::

    <passage>
    Question: <question>?
    Answer:            <- the model continues with " yes" / " no" (no space in a chat template)

Scored like the MMLU exams (``evaluator``): the logits of the two answers' first distinct tokens, or
generation and the first "yes" / "no" word.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from mindspeed_lora.errors import UserError
from mindspeed_lora.jsonl import iter_json_objects

SUBJECT = "boolq"
ANSWERS = ("yes", "no")
_WORD = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


@dataclass(frozen=True)
class BoolQuestion:
    subject: str
    index: int
    """Line order over the files (0-based)."""
    passage: str
    question: str
    answer: str
    """"yes" or "no"."""


def boolq_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise UserError(f"--task-data-path {path}: no such file or directory")
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".jsonl"))
    if not files:
        raise UserError(f"--task-data-path {path}: no .jsonl files (BoolQ's layout: one JSON object per line with "
                        "question, passage and answer)")
    return files


def _answer(obj: dict, where: str) -> str:
    value = obj["answer"] if "answer" in obj else obj.get("label")
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        value = value.strip().lower() == "true"
    if value in (True, 1):
        return "yes"
    if value in (False, 0):
        return "no"
    raise UserError(f"{where}: answer {value!r}; expected true or false (key 'answer', or SuperGLUE's 'label')")


def load_boolq(path: str) -> list[BoolQuestion]:
    out = []
    for file in boolq_files(path):
        for where, obj in iter_json_objects(file):
            if not {"question", "passage"} <= set(obj):
                raise UserError(f"{where}: expected an object with question, passage and answer")
            out.append(BoolQuestion(SUBJECT, len(out), str(obj["passage"]).strip(), str(obj["question"]).strip(),
                                    _answer(obj, where)))
    if not out:
        raise UserError(f"--task-data-path {path}: no questions")
    return out


def boolq_prompt(q: BoolQuestion, cue: str) -> str:
    question = q.question if q.question.endswith("?") else q.question + "?"
    return f"{q.passage}\nQuestion: {question}\n{cue}"


def parse_yes_no(text: str) -> str:
    m = _WORD.search(text)
    return m.group(1).lower() if m else ""
