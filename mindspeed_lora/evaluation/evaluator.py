"""Score a model on an MMLU-layout exam or BoolQ: by the logits of the answers (default) or by generating and
reading the first answer (a letter A-D; yes / no); questions split across data-parallel ranks; per-subject and
overall accuracy.

Logit scoring: the answers' continuations (" A".." D" after ``Answer:``, "A".."D" in Chinese or chat prompts;
" yes" / " no") are tokenized on their own; their common leading tokens are appended to the prompt and the
candidates are the distinct next tokens. The prediction is the candidate with the largest logit at the
prompt's last position.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch

from mindspeed_lora.checkpoint.megatron_io import atomic_write_text
from mindspeed_lora.errors import UserError
from mindspeed_lora.evaluation import boolq
from mindspeed_lora.evaluation.mmlu import (
    DEFAULT_LANGUAGE,
    LETTERS,
    STYLES,
    PromptStyle,
    Question,
    build_prompt,
    load_exam,
    resolve_exam_dir,
)
from mindspeed_lora.inference.prompting import ChatFormat, RawFormat

TASKS = ("mmlu", "cmmlu", "ceval", "boolq")
ANSWERS = {"mmlu": LETTERS, "cmmlu": LETTERS, "ceval": LETTERS, "boolq": boolq.ANSWERS}
METHODS = ("logits", "generate")
_LETTER = re.compile(r"(?<![A-Za-z])([ABCD])(?![A-Za-z])")


@dataclass
class EvalConfig:
    """One exam run; built from the evaluation flags (``mindspeed_lora.arguments.inference``)."""

    task: str
    data_path: str
    split: str | None = None
    """The scored split; default test (mmlu, cmmlu) or val (ceval)."""
    shots: int = 5
    method: str = "logits"
    max_eval_samples: int | None = None
    """Score only the first N questions of each subject."""
    batch_size: int = 4
    language: str | None = None
    """Prompt language, en or zh; default by task."""
    max_new_tokens: int = 8
    """Generation scoring: tokens generated before looking for the letter."""
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
        if self.task == "boolq":
            self.shots = 0  # zero-shot, as BoolQ is usually reported
        self.language = self.language or DEFAULT_LANGUAGE.get(self.task, "en")
        if self.language not in STYLES:
            raise UserError(f"--eval-language {self.language!r}: expected one of {sorted(STYLES)}")


@dataclass(frozen=True)
class Prediction:
    subject: str
    index: int
    answer: str
    prediction: str
    """"A".."D" (or "yes" / "no"), or "" when generation produced no answer."""
    truncated: bool = False
    """The prompt was longer than the model allows and lost its oldest tokens."""


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


def parse_letter(text: str) -> str:
    m = _LETTER.search(text)
    return m.group(1) if m else ""


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


class ExamScorer:
    """Scores questions with one model; ``fmt`` puts the exam text in a chat template (default: raw text)."""

    def __init__(self, engine, tokenizer, cfg: EvalConfig, fmt: ChatFormat | None = None, generation=None):
        self.engine, self.tokenizer, self.cfg = engine, tokenizer, cfg
        self.fmt = fmt or RawFormat(tokenizer)
        chat = not isinstance(self.fmt, RawFormat)
        base = STYLES[cfg.language]
        # A chat template puts the answer at the start of the assistant turn: no separating space.
        self.style = PromptStyle(base.header, base.cue, "" if chat else base.answer_prefix)
        self.generation = generation
        self.answers = ANSWERS[cfg.task]
        if cfg.method == "logits":
            self.suffix, self.candidates = letter_candidates(tokenizer, self.style.answer_prefix, self.answers)

    def limit(self) -> int:
        """Most prompt tokens: the model's positions, less the generated tokens when scoring by generation."""
        return self.engine.max_positions - (self.cfg.max_new_tokens if self.cfg.method == "generate" else 0)

    def prompt_ids(self, q, examples: list[Question]) -> tuple[list[int], bool]:
        """The prompt's tokens, and whether an over-long few-shot context lost its oldest tokens."""
        text = boolq.boolq_prompt(q, self.style.cue) if self.cfg.task == "boolq" else \
            build_prompt(q, examples, self.style)
        ids = self.fmt.encode([{"role": "user", "content": text}])
        if self.cfg.method == "logits":
            ids = ids + self.suffix
        limit = self.limit()
        return ids[-limit:], len(ids) > limit

    def score(self, batch: list[tuple[Question, list[int], bool]]) -> list[str]:
        prompts = [ids for _, ids, _ in batch]
        if self.cfg.method == "logits":
            from mindspeed_lora.inference.generation import left_pad

            ids, valid = left_pad(prompts, self.tokenizer.pad_token_id or 0)
            logits = self.engine.logits(ids, valid, last_only=True)[:, -1]
            picks = logits[:, self.candidates].argmax(dim=-1).tolist()
            return [self.answers[i] for i in picks]
        from mindspeed_lora.inference.generation import generate

        parse = boolq.parse_yes_no if self.cfg.task == "boolq" else parse_letter
        outs = generate(self.engine, prompts, self.generation)
        return [parse(self.tokenizer.decode(o.content_tokens, skip_special_tokens=True)) for o in outs]


def evaluate(scorer: ExamScorer, dp_rank: int = 0, dp_size: int = 1, dp_group=None,
             progress: bool = False) -> list[Prediction]:
    """Every data-parallel rank scores its share (every dp_size-th question); all ranks get all predictions."""
    from tqdm import tqdm

    cfg = scorer.cfg
    if cfg.task == "boolq":
        scored, fewshot = {boolq.SUBJECT: boolq.load_boolq(cfg.data_path)}, {boolq.SUBJECT: []}
    else:
        scored, fewshot = load_exam(resolve_exam_dir(cfg.data_path, cfg.task, cfg.split), cfg.shots)
    items = []
    for subject in sorted(scored):
        questions = scored[subject][: cfg.max_eval_samples] if cfg.max_eval_samples else scored[subject]
        items += [(q, fewshot[subject]) for q in questions]
    mine = items[dp_rank::dp_size]
    # Similar lengths batch together (less padding); results are keyed, so the order does not matter.
    work = sorted(((q, *scorer.prompt_ids(q, ex)) for q, ex in mine), key=lambda t: len(t[1]))
    local = []
    bar = tqdm(total=len(work), desc=f"{cfg.task}", disable=not progress)
    for batch in _batches(work, cfg.batch_size):
        for (q, _, cut), letter in zip(batch, scorer.score(batch)):
            local.append(Prediction(q.subject, q.index, q.answer, letter, cut))
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
        (pred_path, "".join(json.dumps(p.__dict__, ensure_ascii=False) + "\n" for p in predictions)),
    ):
        atomic_write_text(path, text)
    return acc_path, pred_path
