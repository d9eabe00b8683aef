"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p (HF's order).

Sampling draws from a ``torch.Generator`` seeded the same on every tensor-parallel rank; the logits it sees are
gathered over TP and bitwise identical on every rank, so every rank draws the same token without a broadcast.
"""
from __future__ import annotations

import torch


def warp_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """fp32 logits [b, v] -> logits with filtered entries at -inf: divide by temperature, keep the top_k
    largest (0 = all), then keep the smallest set of largest-probability tokens whose mass reaches top_p."""
    scores = logits.float()
    if temperature != 1.0:
        scores = scores / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        # Ascending order: a token goes when the mass of everything below it (it included) is <= 1 - top_p,
        # i.e. the tokens above it already reach top_p. The largest token always stays.
        ordered, order = torch.sort(scores, dim=-1)
        below = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = below <= 1.0 - top_p
        drop_sorted[..., -1] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def choose_next(logits: torch.Tensor, do_sample: bool, generator: torch.Generator | None = None,
                temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Next token ids [b] from logits [b, v]."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = warp_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
