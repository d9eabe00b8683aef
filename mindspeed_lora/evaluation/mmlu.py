"""Multiple-choice exams in the MMLU CSV layout (MMLU, CMMLU, C-Eval): reading the files and writing prompts.

Layout (one CSV per subject and split)::

    root/dev/<subject>_dev.csv      few-shot examples (5 per subject in the public releases)
    root/val/<subject>_val.csv      C-Eval's scored split (its test split has no answers)
    root/test/<subject>_test.csv    MMLU's and CMMLU's scored split

``--task-data-path`` may be ``root`` or the scored split's own directory (``root/test``), as MindSpeed-LLM takes
it. Rows are question, A, B, C, D, answer: MMLU's files have no header; CMMLU's and C-Eval's have one (columns
found by name: Question/question, A-D, Answer/answer; other columns such as id or explanation are ignored).

Prompts (English for mmlu, Chinese for cmmlu/ceval, or ``--eval-language``)::

    The following are multiple choice questions (with answers) about abstract algebra.

    <question>
    A. <a>
    B. <b>
    C. <c>
    D. <d>
    Answer: B            <- one block per few-shot example, separated by a blank line

    <question>
    ...
    Answer:              <- the model continues with " A" / " B" / " C" / " D"

Chinese: header ``以下是关于<subject>的单项选择题，请直接给出正确答案的选项。`` and cue ``答案：``, continued
with ``A``..``D`` (no space). The subject is the file's stem with underscores as spaces.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass

from mindspeed_lora.errors import UserError

LETTERS = ("A", "B", "C", "D")
SPLITS = ("dev", "val", "test")
DEFAULT_SPLIT = {"mmlu": "test", "cmmlu": "test", "ceval": "val"}
DEFAULT_LANGUAGE = {"mmlu": "en", "cmmlu": "zh", "ceval": "zh"}


@dataclass(frozen=True)
class Question:
    subject: str
    index: int
    """Row number in its file (0-based, header excluded)."""
    question: str
    choices: tuple[str, str, str, str]
    answer: str
    """"A".."D"; empty where the split has no answers."""


@dataclass(frozen=True)
class PromptStyle:
    header: str
    """With ``{subject}``."""
    cue: str
    """Ends every question block; the answer letter follows."""
    answer_prefix: str
    """Between the cue and the letter in a completed example and in the scored continuation."""


STYLES = {
    "en": PromptStyle("The following are multiple choice questions (with answers) about {subject}.\n\n",
                      "Answer:", " "),
    "zh": PromptStyle("以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n", "答案：", ""),
}


def _read_rows(path: str) -> list[list[str]]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return list(csv.reader(f))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e})") from e
    except csv.Error as e:
        raise UserError(f"{path}: not a readable CSV file ({e})") from e


def read_subject_file(path: str, subject: str, need_answers: bool = True) -> list[Question]:
    """Questions of one CSV (with or without a header row); errors name the file and the line."""
    rows = _read_rows(path)
    if not rows:
        raise UserError(f"{path}: empty file; expected rows of question,A,B,C,D,answer")
    header = [c.strip().lower() for c in rows[0]]
    if "question" in header and "answer" in header:
        missing = [c for c in ("question", "a", "b", "c", "d", "answer") if c not in header]
        if missing:
            raise UserError(f"{path}:1: header {rows[0]} lacks columns {missing}")
        cols = [header.index(c) for c in ("question", "a", "b", "c", "d", "answer")]
        body, first_line = rows[1:], 2
    else:
        cols, body, first_line = [0, 1, 2, 3, 4, 5], rows, 1
    out = []
    for i, row in enumerate(body):
        line = first_line + i
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(cols):
            raise UserError(f"{path}:{line}: {len(row)} columns; expected question,A,B,C,D,answer "
                            f"(a header row naming them is allowed)")
        q, a, b, c, d, ans = (row[j] for j in cols)
        ans = ans.strip().upper()
        if ans not in LETTERS and (need_answers or ans):
            hint = " (C-Eval's test split has no answers: evaluate its val split)" if not ans else ""
            raise UserError(f"{path}:{line}: answer {ans!r}; expected one of A, B, C, D{hint}")
        out.append(Question(subject, len(out), q.strip(), (a.strip(), b.strip(), c.strip(), d.strip()), ans))
    if not out:
        raise UserError(f"{path}: no questions")
    return out


@dataclass(frozen=True)
class ExamDir:
    root: str
    split: str
    subjects: tuple[str, ...]

    def path(self, subject: str, split: str) -> str:
        return os.path.join(self.root, split, f"{subject}_{split}.csv")


def resolve_exam_dir(path: str, task: str, split: str | None = None) -> ExamDir:
    """Find the layout from ``path`` (the root or the scored split's directory) and list the subjects."""
    if not os.path.isdir(path):
        raise UserError(f"--task-data-path {path}: no such directory")
    norm = os.path.normpath(path)
    if os.path.basename(norm) in SPLITS and not any(os.path.isdir(os.path.join(norm, s)) for s in SPLITS):
        root, given = os.path.dirname(norm), os.path.basename(norm)
        if split is not None and split != given:
            raise UserError(f"--task-data-path {path} is the {given!r} split but --eval-split is {split!r}")
        split = given
    else:
        root = norm
    split = split or DEFAULT_SPLIT[task]
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        raise UserError(
            f"--task-data-path {path}: expected the MMLU CSV layout {root}/{{dev,val,test}}/<subject>_<split>.csv "
            f"with a {split!r} directory; found directories {found}"
        )
    suffix = f"_{split}.csv"
    subjects = sorted(f[: -len(suffix)] for f in os.listdir(split_dir) if f.endswith(suffix))
    if not subjects:
        raise UserError(f"{split_dir}: no files named <subject>{suffix} (the MMLU CSV layout)")
    return ExamDir(root, split, tuple(subjects))


def load_exam(exam: ExamDir, shots: int) -> tuple[dict[str, list[Question]], dict[str, list[Question]]]:
    """(scored questions per subject, few-shot examples per subject); dev files are required when shots > 0."""
    scored, fewshot = {}, {}
    for subject in exam.subjects:
        scored[subject] = read_subject_file(exam.path(subject, exam.split), subject)
        if shots > 0:
            dev = exam.path(subject, "dev")
            if not os.path.isfile(dev):
                raise UserError(f"{dev}: missing; {shots}-shot prompts take their examples from the dev split "
                                "(or pass --num-shots 0)")
            examples = read_subject_file(dev, subject)
            fewshot[subject] = examples[:shots]
        else:
            fewshot[subject] = []
    return scored, fewshot


def question_block(q: Question, style: PromptStyle, with_answer: bool) -> str:
    lines = [q.question] + [f"{letter}. {text}" for letter, text in zip(LETTERS, q.choices)]
    answer = f"{style.cue}{style.answer_prefix}{q.answer}" if with_answer else style.cue
    return "\n".join(lines + [answer])


def build_prompt(q: Question, examples: list[Question], style: PromptStyle) -> str:
    """The few-shot prompt for ``q``, ending with the answer cue."""
    blocks = [question_block(e, style, True) for e in examples] + [question_block(q, style, False)]
    return style.header.format(subject=q.subject.replace("_", " ")) + "\n\n".join(blocks)
