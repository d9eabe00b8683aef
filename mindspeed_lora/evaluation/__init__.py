"""MMLU-style multiple-choice evaluation (MMLU, CMMLU, C-Eval in the MMLU CSV layout)."""
