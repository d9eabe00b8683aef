"""Tiny SFT datasets written in preprocess_data.py's format, and tiny models, for the training tests.

The data is a learnable toy task: a prompt of random tokens (labels -100) followed by a response that is a
fixed function of the prompt, so a 2-layer model's loss visibly falls within a few steps.
"""
from __future__ import annotations

import os

import numpy as np

from mindspeed_lora import tiny
from mindspeed_lora.data.sft_dataset import KEYS, file_prefix

VOCAB = 512
IGNORE = -100


def write_sft_data(prefix: str, samples: list[dict[str, np.ndarray]]) -> str:
    """Write samples ({input_ids, attention_mask, labels}) as {prefix}_packed_{key}_document.bin/.idx."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    for key in KEYS:
        base = file_prefix(prefix, key)
        builder = IndexedDatasetBuilder(base + ".bin", dtype=np.int32)
        for s in samples:
            builder.add_document(torch.tensor(np.asarray(s[key], dtype=np.int32)), [len(s[key])])
        builder.finalize(base + ".idx")
    return prefix


def toy_samples(n: int, seed: int = 0, min_prompt: int = 3, max_prompt: int = 8, response: int = 6
                ) -> list[dict[str, np.ndarray]]:
    """Prompt p (random ids 10..99), response = (p[0] + 7 * j) mod 90 + 100 for j < response, then eos=2."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = rng.integers(10, 100, size=int(rng.integers(min_prompt, max_prompt + 1)))
        r = np.array([(int(p[0]) + 7 * j) % 90 + 100 for j in range(response)] + [2])
        ids = np.concatenate([p, r])
        labels = np.concatenate([np.full(len(p), IGNORE), r])
        out.append({"input_ids": ids, "attention_mask": np.ones(len(ids), dtype=np.int64), "labels": labels})
    return out


def neat_pack(samples: list[dict[str, np.ndarray]], seq_length: int, pad_id: int = 0
              ) -> list[dict[str, np.ndarray]]:
    """Greedy neat packing as preprocess_data.py --neat-pack stores it: segment ids 1, 2, ... and 0 = pad."""
    packs, cur = [], []

    def flush():
        ids = np.concatenate([s["input_ids"] for s in cur])
        labels = np.concatenate([s["labels"] for s in cur])
        seg = np.concatenate([np.full(len(s["input_ids"]), i + 1) for i, s in enumerate(cur)])
        pad = seq_length - len(ids)
        packs.append({"input_ids": np.concatenate([ids, np.full(pad, pad_id)]),
                      "labels": np.concatenate([labels, np.full(pad, IGNORE)]),
                      "attention_mask": np.concatenate([seg, np.zeros(pad, dtype=np.int64)])})

    for s in samples:
        if cur and sum(len(c["input_ids"]) for c in cur) + len(s["input_ids"]) > seq_length:
            flush()
            cur = []
        cur.append(s)
    if cur:
        flush()
    return packs


def tiny_model_dir(root: str, family: str = "qwen3", seed: int = 7) -> str:
    path = os.path.join(root, f"hf_{family}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        tiny.build_hf_model(family, path, seed=seed)
    return path


def train_argv(load: str, data: str, *, iters: int | None = 5, gbs: int = 4, mbs: int = 1, seq: int = 32,
               lr: float = 1e-3, extra: list[str] | None = None) -> list[str]:
    """posttrain_gpt.py flags of a tiny fp32 SFT run (``iters=None``: give --train-epochs in ``extra``)."""
    return ["--stage", "sft", "--load", load, "--data-path", data, "--seq-length", str(seq),
            "--micro-batch-size", str(mbs), "--global-batch-size", str(gbs),
            *(["--train-iters", str(iters)] if iters is not None else []),
            "--lr", str(lr), "--min-lr", str(lr / 10), "--lr-decay-style", "cosine", "--weight-decay", "0.0",
            "--clip-grad", "1.0", "--seed", "1234", "--log-interval", "1", "--split", "100,0,0",
            *(extra or [])]
