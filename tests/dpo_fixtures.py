"""A tiny synthetic preference set in preprocess_data.py's pairwise format, for the DPO tests.

Prompt: random ids 10..99 (labels -100). Chosen response: (p[0] + 7j) mod 90 + 100; rejected response:
(p[0] + 3j) mod 90 + 300, each followed by eos 2 -- two fixed patterns a 2-layer model can tell apart.
"""
from __future__ import annotations

import os

import numpy as np

from mindspeed_lora.data.pairwise_dataset import KEYS
from mindspeed_lora.data.sft_dataset import file_prefix

IGNORE = -100


def preference_pairs(n: int, seed: int = 0, response: int = 5) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = rng.integers(10, 100, size=int(rng.integers(3, 7)))
        sample = {}
        for side, step, base in (("chosen", 7, 100), ("rejected", 3, 300)):
            r = np.array([(int(p[0]) + step * j) % 90 + base for j in range(response)] + [2])
            sample[f"{side}_input_ids"] = np.concatenate([p, r])
            sample[f"{side}_labels"] = np.concatenate([np.full(len(p), IGNORE), r])
        out.append(sample)
    return out


def write_pairwise_data(prefix: str, pairs: list[dict[str, np.ndarray]]) -> str:
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    for key in KEYS:
        base = file_prefix(prefix, key)
        builder = IndexedDatasetBuilder(base + ".bin", dtype=np.int32)
        for s in pairs:
            builder.add_document(torch.tensor(np.asarray(s[key], dtype=np.int32)), [len(s[key])])
        builder.finalize(base + ".idx")
    return prefix


def dpo_argv(load: str, data: str, *, iters: int = 5, gbs: int = 4, mbs: int = 1, seq: int = 16, lr: float = 1e-3,
             extra: list[str] | None = None) -> list[str]:
    return ["--stage", "dpo", "--load", load, "--data-path", data, "--seq-length", str(seq),
            "--micro-batch-size", str(mbs), "--global-batch-size", str(gbs), "--train-iters", str(iters),
            "--lr", str(lr), "--lr-decay-style", "constant", "--weight-decay", "0.0", "--clip-grad", "1.0",
            "--seed", "1234", "--log-interval", "1", *(extra or [])]
