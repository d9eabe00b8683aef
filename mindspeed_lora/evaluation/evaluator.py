"""Score a model on an exam (MMLU, C-Eval, CMMLU), BoolQ or GSM8K: by the logits of the answers (default for the
exams and BoolQ) or by generating and reading the answer off the text (a letter A-D; yes / no; GSM8K's last
number, always); questions split across data-parallel ranks; per-subject and overall accuracy.

Logit scoring: the answers' continuations (" A".." D" after ``Answer:``, "A".."D" in Chinese or chat prompts;
" yes" / " no") are tokenized on their own; their common leading tokens are appended to the prompt and the
candidates are the distinct next tokens. The prediction is the candidate with the largest logit at the
prompt's last position.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

from mindspeed_lora.checkpoint.megatron_io import atomic_write_text
from mindspeed_lora.errors import UserError
from mindspeed_lora.evaluation import boolq, gsm8k
from mindspeed_lora.evaluation.mmlu import (
    DEFAULT_LANGUAGE,
    LANGUAGE_STYLES,
    LETTERS,
    PromptStyle,
    build_prompt,
    load_exam,
    prompt_style,
    resolve_exam_dir,
)
from mindspeed_lora.inference.prompting import ChatFormat, RawFormat, stop_sequences

METHODS = ("logits", "generate")
_LETTER = re.compile(r"(?<![A-Za-z])([ABCD])(?![A-Za-z])")


def parse_letter(text: str) -> str:
    m = _LETTER.search(text)
    return m.group(1) if m else ""


Scored = dict[str, list[tuple[Any, list]]]
"""Subject -> (question, its few-shot examples) per scored question, in file order."""


def _exam_questions(cfg: EvalConfig) -> Scored:
    scored, fewshot = load_exam(resolve_exam_dir(cfg.data_path, cfg.task, cfg.split), cfg.shots)
    return {subject: [(q, fewshot[subject]) for q in questions] for subject, questions in scored.items()}


def _exam_split(cfg: EvalConfig) -> str:
    return resolve_exam_dir(cfg.data_path, cfg.task, cfg.split).split


def _boolq_questions(cfg: EvalConfig) -> Scored:
    return {boolq.SUBJECT: [(q, []) for q in boolq.load_boolq(cfg.data_path)]}


def _boolq_split(cfg: EvalConfig) -> str:
    return "+".join(os.path.splitext(os.path.basename(f))[0] for f in boolq.boolq_files(cfg.data_path))


def _boolq_prompt(q: boolq.BoolQuestion, examples: list, style: PromptStyle) -> str:
    return boolq.boolq_prompt(q, style.cue)


def _gsm8k_questions(cfg: EvalConfig) -> Scored:
    return {gsm8k.SUBJECT: gsm8k.load_gsm8k(cfg.data_path, cfg.shots)}


def _gsm8k_split(cfg: EvalConfig) -> str:
    return os.path.splitext(os.path.basename(gsm8k.gsm8k_files(cfg.data_path)[0]))[0]


def _gsm8k_prompt(q: gsm8k.MathQuestion, examples: list, style: PromptStyle) -> str:
    return gsm8k.gsm8k_prompt(q, examples)


@dataclass(frozen=True)
class Task:
    """What differs between tasks: reading the data, writing a prompt, reading an answer off generated text."""

    load: Callable[[EvalConfig], Scored]
    split: Callable[[EvalConfig], str]
    """The scored split's name (checks the data's layout)."""
    prompt: Callable[[Any, list, PromptStyle], str]
    parse: Callable[[str], str]
    answers: tuple[str, ...] | None
    """The candidates of logit scoring; None: scored by generation only."""
    max_new_tokens: int = 8
    """Generation scoring's default budget (``--max-new-tokens``)."""
    fewshot: bool = True
    stop_text: str | None = None
    """Generation stops once a row's text reaches this (``parse`` ignores everything from it on)."""


_EXAM = Task(_exam_questions, _exam_split, build_prompt, parse_letter, LETTERS)
TASKS = {
    "mmlu": _EXAM,
    "cmmlu": _EXAM,
    "ceval": _EXAM,
    # zero-shot, as BoolQ is usually reported
    "boolq": Task(_boolq_questions, _boolq_split, _boolq_prompt, boolq.parse_yes_no, boolq.ANSWERS, fewshot=False),
    "gsm8k": Task(_gsm8k_questions, _gsm8k_split, _gsm8k_prompt, gsm8k.parse_number, None, max_new_tokens=256,
                  stop_text=gsm8k.NEXT_QUESTION),
}


@dataclass
class EvalConfig:
    """One exam run; built from the evaluation flags (``mindspeed_lora.arguments.inference``)."""

    task: str
    data_path: str
    split: str | None = None
    """The scored split; default test (mmlu, cmmlu) or val (ceval)."""
    shots: int = 5
    method: str = "logits"
    """gsm8k is always scored by generation."""
    max_eval_samples: int | None = None
    """Score only the first N questions of each subject."""
    batch_size: int = 4
    language: str | None = None
    """Prompt language, en or zh; default by task."""
    max_new_tokens: int | None = None
    """Generation scoring: tokens generated before reading the answer; default 8, 256 for gsm8k."""
    output_dir: str = "eval_results"

    def __post_init__(self):
        if self.task not in TASKS:
            raise UserError(f"--task {self.task!r}: expected one of {list(TASKS)}")
        if self.method not in METHODS:
            raise UserError(f"--eval-method {self.method!r}: expected one of {list(METHODS)}")
        if self.shots < 0:
            raise UserError(f"--num-shots={self.shots}: expected >= 0")
        if self.max_eval_samples is not None and self.max_eval_samples < 1:
            raise UserError(f"--max-eval-samples={self.max_eval_samples}: expected a positive number")
        if self.batch_size < 1:
            raise UserError(f"--evaluation-batch-size={self.batch_size}: expected a positive number")
        spec = TASKS[self.task]
        if self.max_new_tokens is None:
            self.max_new_tokens = spec.max_new_tokens
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens={self.max_new_tokens}: expected a positive number")
        if not spec.fewshot:
            self.shots = 0
        if spec.answers is None:
            self.method = "generate"
        self.language = self.language or DEFAULT_LANGUAGE.get(self.task, "en")
        if self.language not in LANGUAGE_STYLES:
            raise UserError(f"--eval-language {self.language!r}: expected one of {sorted(LANGUAGE_STYLES)}")


def data_split(cfg: EvalConfig) -> str:
    """The scored split's name (BoolQ: its files' names; GSM8K: the scored file's); checks the data's layout."""
    return TASKS[cfg.task].split(cfg)


@dataclass(frozen=True)
class Prediction:
    subject: str
    index: int
    answer: str
    prediction: str
    """"A".."D", "yes" / "no" or a number, or "" when generation produced no answer."""
    truncated: bool = False
    """The prompt was longer than the model allows and lost its oldest tokens."""
    response: str | None = None
    """Generation scoring: the generated text."""


def letter_candidates(tokenizer, answer_prefix: str, answers: tuple[str, ...] = LETTERS) -> tuple[list[int], list[int]]:
    """(tokens to append to every prompt, one candidate token id per answer) for continuations prefix+answer."""
    seqs = [tokenizer(answer_prefix + a, add_special_tokens=False)["input_ids"] for a in answers]
    common = 0
    while all(len(s) > common for s in seqs) and len({s[common] for s in seqs}) == 1:
        common += 1
    if any(len(s) <= common for s in seqs) or len({s[common] for s in seqs}) != len(answers):
        raise UserError(f"the tokenizer does not give the answers {answers} distinct tokens after "
                        f"{answer_prefix!r} ({seqs}); use --eval-method generate")
    return list(seqs[0][:common]), [s[common] for s in seqs]


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


class ExamScorer:
    """Scores questions with one model; ``fmt`` puts the exam text in a chat template (default: raw text)."""

    def __init__(self, engine, tokenizer, cfg: EvalConfig, fmt: ChatFormat | None = None, generation=None):
        self.engine, self.tokenizer, self.cfg = engine, tokenizer, cfg
        self.task = TASKS[cfg.task]
        self.fmt = fmt or RawFormat(tokenizer)
        style = prompt_style(cfg.task, cfg.language)
        # A chat template puts the answer at the start of the assistant turn: no separating space.
        self.style = style if isinstance(self.fmt, RawFormat) else dataclasses.replace(style, answer_prefix="")
        self.generation = generation
        if generation is not None and self.task.stop_text:
            self.generation = dataclasses.replace(
                generation, stop_sequences=generation.stop_sequences + stop_sequences(tokenizer, self.task.stop_text))
        if cfg.method == "logits":
            self.suffix, self.candidates = letter_candidates(tokenizer, self.style.answer_prefix, self.task.answers)

    def limit(self) -> int:
        """Most prompt tokens: the model's positions, less the generated tokens when scoring by generation."""
        return self.engine.max_positions - (self.cfg.max_new_tokens if self.cfg.method == "generate" else 0)

    def prompt_text(self, q, examples: list) -> str:
        return self.task.prompt(q, examples, self.style)

    def prompt_ids(self, q, examples: list) -> tuple[list[int], bool]:
        """The prompt's tokens, and whether an over-long few-shot context lost its oldest tokens."""
        ids = self.fmt.encode([{"role": "user", "content": self.prompt_text(q, examples)}])
        if self.cfg.method == "logits":
            ids = ids + self.suffix
        limit = self.limit()
        return ids[-limit:], len(ids) > limit

    def score(self, batch: list[tuple[Any, list[int], bool]]) -> list[tuple[str, str | None]]:
        """(prediction, generated text or None) per question of the batch."""
        prompts = [ids for _, ids, _ in batch]
        if self.cfg.method == "logits":
            from mindspeed_lora.inference.generation import left_pad

            ids, valid = left_pad(prompts, self.tokenizer.pad_token_id or 0)
            logits = self.engine.logits(ids, valid, last_only=True)[:, -1]
            picks = logits[:, self.candidates].argmax(dim=-1).tolist()
            return [(self.task.answers[i], None) for i in picks]
        from mindspeed_lora.inference.generation import generate

        outs = generate(self.engine, prompts, self.generation)
        texts = [self.tokenizer.decode(o.content_tokens, skip_special_tokens=True) for o in outs]
        return [(self.task.parse(text), text) for text in texts]


def evaluate(scorer: ExamScorer, dp_rank: int = 0, dp_size: int = 1, dp_group=None,
             progress: bool = False) -> list[Prediction]:
    """Every data-parallel rank scores its share (every dp_size-th question); all ranks get all predictions."""
    from tqdm import tqdm

    cfg = scorer.cfg
    scored = scorer.task.load(cfg)
    items = [item for subject in sorted(scored) for item in scored[subject][: cfg.max_eval_samples]]
    mine = items[dp_rank::dp_size]
    # Similar lengths batch together (less padding); results are keyed, so the order does not matter.
    work = sorted(((q, *scorer.prompt_ids(q, ex)) for q, ex in mine), key=lambda t: len(t[1]))
    local = []
    bar = tqdm(total=len(work), desc=f"{cfg.task}", disable=not progress)
    for batch in _batches(work, cfg.batch_size):
        for (q, _, cut), (prediction, response) in zip(batch, scorer.score(batch)):
            local.append(Prediction(q.subject, q.index, q.answer, prediction, cut, response))
        bar.update(len(batch))
    bar.close()
    if dp_size > 1:
        gathered: list = [None] * dp_size
        torch.distributed.all_gather_object(gathered, local, group=dp_group)
        local = [p for part in gathered for p in part]
    return sorted(local, key=lambda p: (p.subject, p.index))


def summarize(predictions: list[Prediction], cfg: EvalConfig, split: str) -> dict:
    subjects: dict[str, dict] = {}
    for p in predictions:
        s = subjects.setdefault(p.subject, {"correct": 0, "total": 0})
        s["total"] += 1
        s["correct"] += int(p.prediction == p.answer)
    for s in subjects.values():
        s["accuracy"] = s["correct"] / s["total"]
    correct = sum(s["correct"] for s in subjects.values())
    total = sum(s["total"] for s in subjects.values())
    return {
        "task": cfg.task, "split": split, "shots": cfg.shots, "method": cfg.method,
        "subjects": dict(sorted(subjects.items())),
        "overall": {"correct": correct, "total": total, "accuracy": correct / total if total else 0.0},
        "macro_accuracy": sum(s["accuracy"] for s in subjects.values()) / len(subjects) if subjects else 0.0,
        "truncated_prompts": sum(p.truncated for p in predictions),
    }


def format_table(summary: dict) -> str:
    rows = [(name, s["total"], s["correct"], s["accuracy"]) for name, s in summary["subjects"].items()]
    o = summary["overall"]
    rows.append(("overall", o["total"], o["correct"], o["accuracy"]))
    width = max(len("subject"), *(len(r[0]) for r in rows))
    lines = [f"{'subject':<{width}}  {'questions':>9}  {'correct':>7}  {'accuracy':>8}"]
    lines.append("-" * len(lines[0]))
    for i, (name, total, correct, acc) in enumerate(rows):
        if i == len(rows) - 1:
            lines.append("-" * len(lines[0]))
        lines.append(f"{name:<{width}}  {total:>9}  {correct:>7}  {acc:>8.4f}")
    return "\n".join(lines)


def write_results(summary: dict, predictions: list[Prediction], output_dir: str) -> tuple[str, str]:
    """``<task>_accuracy.json`` and ``<task>_predictions.jsonl`` in output_dir, each written atomically."""
    os.makedirs(output_dir, exist_ok=True)
    task = summary["task"]
    acc_path = os.path.join(output_dir, f"{task}_accuracy.json")
    pred_path = os.path.join(output_dir, f"{task}_predictions.jsonl")
    for path, text in (
        (acc_path, json.dumps(summary, indent=2, ensure_ascii=False) + "\n"),
        (pred_path, "".join(json.dumps({k: v for k, v in p.__dict__.items() if v is not None}, ensure_ascii=False)
                            + "\n" for p in predictions)),
    ):
        atomic_write_text(path, text)
    return acc_path, pred_path
