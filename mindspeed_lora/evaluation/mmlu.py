"""Four-option multiple-choice exams in per-subject CSVs (MMLU, C-Eval, CMMLU): reading the files and writing each
exam's own prompt.

Layout (one CSV per subject and split)::

    root/dev/<subject>_dev.csv      few-shot examples (5 per subject in the public releases)
    root/val/<subject>_val.csv      C-Eval's scored split (its test split has no answers)
    root/test/<subject>_test.csv    MMLU's scored split
    root/test/<subject>.csv         CMMLU names its files by subject only (dev/<subject>.csv likewise)

``--task-data-path`` may be ``root`` or the scored split's own directory (``root/test``), as MindSpeed-LLM takes
it. Every ``.csv`` of the scored split is a subject, named by its file less ``.csv`` and ``_<split>``; its
few-shot file is ``dev/<subject>_dev.csv`` or ``dev/<subject>.csv``. Rows are question, A, B, C, D, answer:
MMLU's files have no header; C-Eval's (``id,question,A,B,C,D,answer[,explanation]``) and CMMLU's
(``,Question,A,B,C,D,Answer``) have one, and their columns are found by name (other columns are ignored).

Prompts, each exam's official answer-only format (``--eval-language`` swaps in MMLU's for en, CMMLU's for zh)::

    mmlu    The following are multiple choice questions (with answers) about abstract algebra.

            <question>
            A. <a>
            B. <b>
            C. <c>
            D. <d>
            Answer: B            <- one block per few-shot example, separated by a blank line

            <question>
            ...
            Answer:              <- the model continues with " A" / " B" / " C" / " D"

    ceval   以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。   <- then the blocks as above,
            ending 答案：A / 答案：, continued with "A".."D" (no space)

    cmmlu   以下是关于农学的单项选择题，请直接给出正确答案的选项。   <- then blocks "题目：<question>" ... ending
            答案是：A / 答案是：

The subject in C-Eval's and CMMLU's headers is its Chinese name from ``subjects``; MMLU's is the file's subject
with underscores as spaces.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field

from mindspeed_lora.errors import UserError
from mindspeed_lora.evaluation.subjects import CEVAL_SUBJECTS, CMMLU_SUBJECTS

LETTERS = ("A", "B", "C", "D")
SPLITS = ("dev", "val", "test")
COLUMNS = ("question", "A", "B", "C", "D", "answer")
"""Found by name, case aside, in a header row."""
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
    question_prefix: str = ""
    """Before every question."""
    subject_names: dict[str, str] = field(default_factory=dict, hash=False)
    """File subject -> the name in the header; a subject not here is named by its file."""

    def subject_name(self, subject: str) -> str:
        return self.subject_names.get(subject, subject.replace("_", " "))


MMLU_STYLE = PromptStyle("The following are multiple choice questions (with answers) about {subject}.\n\n",
                         "Answer:", " ")
CEVAL_STYLE = PromptStyle("以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n", "答案：", "",
                          subject_names=CEVAL_SUBJECTS)
CMMLU_STYLE = PromptStyle("以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n", "答案是：", "",
                          question_prefix="题目：", subject_names=CMMLU_SUBJECTS)
_NATIVE_STYLE = {"mmlu": MMLU_STYLE, "ceval": CEVAL_STYLE, "cmmlu": CMMLU_STYLE}
LANGUAGE_STYLES = {"en": MMLU_STYLE, "zh": CMMLU_STYLE}
"""The format of a language when it is not the exam's own (MMLU's for en, CMMLU's for zh)."""


def prompt_style(task: str, language: str) -> PromptStyle:
    """The exam's own format in its own language; another language's generic format otherwise."""
    native = _NATIVE_STYLE.get(task)
    if native is not None and DEFAULT_LANGUAGE[task] == language:
        return native
    return LANGUAGE_STYLES[language]


def _read_rows(path: str) -> list[tuple[int, list[str]]]:
    """(first physical line, cells) per row: a quoted cell may span lines, so rows and lines differ."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            rows, start = [], 1
            for row in reader:
                rows.append((start, row))
                start = reader.line_num + 1
            return rows
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e})") from e
    except csv.Error as e:
        raise UserError(f"{path}: not a readable CSV file ({e})") from e


def read_subject_file(path: str, subject: str, need_answers: bool = True) -> list[Question]:
    """Questions of one CSV (with or without a header row); errors name the file, the line and the column."""
    rows = _read_rows(path)
    if not rows:
        raise UserError(f"{path}: empty file; expected rows of question,A,B,C,D,answer")
    header = [c.strip().lower() for c in rows[0][1]]
    if "question" in header:
        missing = [c for c in COLUMNS if c.lower() not in header]
        if missing:
            hint = " (C-Eval's test split has no answers: evaluate its val split)" if missing == ["answer"] else ""
            raise UserError(f"{path}:1: the header {rows[0][1]} has no column {', '.join(missing)}; expected "
                            f"question, A, B, C, D and answer{hint}")
        cols, body = [header.index(c.lower()) for c in COLUMNS], rows[1:]
    else:
        cols, body = list(range(len(COLUMNS))), rows
    out = []
    for line, row in body:
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(cols):
            raise UserError(f"{path}:{line}: {len(row)} columns; expected question,A,B,C,D,answer "
                            f"(a header row naming them is allowed)")
        q, a, b, c, d, ans = (row[j] for j in cols)
        ans = ans.strip().upper()
        if ans not in LETTERS and (need_answers or ans):
            hint = " (C-Eval's test split has no answers: evaluate its val split)" if not ans else ""
            raise UserError(f"{path}:{line}: answer {ans!r} in column {cols[-1] + 1}; expected one of A, B, C, D{hint}")
        out.append(Question(subject, len(out), q.strip(), (a.strip(), b.strip(), c.strip(), d.strip()), ans))
    if not out:
        raise UserError(f"{path}: no questions")
    return out


@dataclass(frozen=True)
class ExamDir:
    root: str
    split: str
    files: dict[str, str] = field(hash=False)
    """Subject -> its file of the scored split."""

    @property
    def subjects(self) -> tuple[str, ...]:
        return tuple(sorted(self.files))

    def dev_file(self, subject: str) -> tuple[str, bool]:
        """(the few-shot file, whether it exists): named as the scored split's files are, else the other way."""
        names = [f"{subject}_dev.csv", f"{subject}.csv"]
        if os.path.basename(self.files[subject]) == f"{subject}.csv":
            names.reverse()
        paths = [os.path.join(self.root, "dev", n) for n in names]
        found = [p for p in paths if os.path.isfile(p)]
        return (found[0], True) if found else (paths[0], False)


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
            f"--task-data-path {path}: expected the exam CSV layout {root}/{{dev,val,test}}/<subject>_<split>.csv "
            f"(or <subject>.csv) with a {split!r} directory; found directories {found}"
        )
    files: dict[str, str] = {}
    for name in sorted(os.listdir(split_dir)):
        if not name.endswith(".csv"):
            continue
        stem = name[: -len(".csv")]
        subject = stem[: -len(f"_{split}")] if stem.endswith(f"_{split}") else stem
        if subject in files:
            raise UserError(f"{split_dir}: {os.path.basename(files[subject])} and {name} are both subject "
                            f"{subject!r}; keep one")
        files[subject] = os.path.join(split_dir, name)
    if not files:
        raise UserError(f"{split_dir}: no .csv files; expected one per subject, <subject>_{split}.csv (MMLU, "
                        "C-Eval) or <subject>.csv (CMMLU)")
    return ExamDir(root, split, files)


def load_exam(exam: ExamDir, shots: int) -> tuple[dict[str, list[Question]], dict[str, list[Question]]]:
    """(scored questions per subject, few-shot examples per subject); dev files are required when shots > 0."""
    scored, fewshot = {}, {}
    for subject in exam.subjects:
        scored[subject] = read_subject_file(exam.files[subject], subject)
        fewshot[subject] = []
        if shots > 0:
            dev, exists = exam.dev_file(subject)
            if not exists:
                raise UserError(f"{dev}: missing; {shots}-shot prompts take their examples from the dev split "
                                "(or pass --num-shots 0)")
            fewshot[subject] = read_subject_file(dev, subject)[:shots]
    return scored, fewshot


def question_block(q: Question, style: PromptStyle, with_answer: bool) -> str:
    lines = [style.question_prefix + q.question] + [f"{letter}. {text}" for letter, text in zip(LETTERS, q.choices)]
    answer = f"{style.cue}{style.answer_prefix}{q.answer}" if with_answer else style.cue
    return "\n".join(lines + [answer])


def build_prompt(q: Question, examples: list[Question], style: PromptStyle) -> str:
    """The few-shot prompt for ``q``, ending with the answer cue."""
    blocks = [question_block(e, style, True) for e in examples] + [question_block(q, style, False)]
    return style.header.format(subject=style.subject_name(q.subject)) + "\n\n".join(blocks)
