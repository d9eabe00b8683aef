"""Evaluation on public benchmarks: multiple-choice exams (MMLU, C-Eval, CMMLU), BoolQ and GSM8K."""
