"""Packing (``--pack`` / ``--neat-pack``): samples -> packs of exactly ``--seq-length`` tokens.

Samples are grouped as MindSpeed-LLM groups them (LLaMA-Factory's greedy knapsack, capacity seq_length - 1):
each pack takes, while anything fits, the longest remaining sample that fits; among samples of equal length
the latest one. Then the pack is padded to seq_length: input_ids with the pad id, labels -100,
attention_mask 1 (``--pack``) or the segment ids 1, 2, 3, ... with 0 on the padding (``--neat-pack``).
The grouping depends only on the lengths, so it is the same for any number of workers.
"""
from __future__ import annotations

import bisect
import os
from typing import Iterator

import numpy as np

from mindspeed_lora.data.encode import IGNORE_INDEX


def greedy_knapsack(lengths: np.ndarray, capacity: int) -> Iterator[list[int]]:
    """Packs as lists of sample indices, in MindSpeed-LLM's order. All lengths must be in [1, capacity].

    O(n log L): a sorted list of the distinct lengths still available replaces the sorted list of all
    lengths that the reference pops from (quadratic on millions of samples).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    assert lengths.size == 0 or (lengths.min() >= 1 and lengths.max() <= capacity)
    order = np.argsort(lengths, kind="stable")  # by length, then by index
    sorted_lengths = lengths[order]
    available = [int(v) for v in np.unique(sorted_lengths)]
    top = {v: int(np.searchsorted(sorted_lengths, v, side="right")) for v in available}  # one past the last
    remaining = lengths.size
    while remaining:
        pack, room = [], capacity
        while True:
            k = bisect.bisect_right(available, room) - 1
            if k < 0:
                break
            length = available[k]
            top[length] -= 1
            pack.append(int(order[top[length]]))
            if top[length] == 0 or sorted_lengths[top[length] - 1] != length:
                del available[k]
            room -= length
            remaining -= 1
        yield pack


class PackWriter:
    """Reads unpacked samples back from their .bin files (by offset, without mapping whole files) and
    writes packs."""

    def __init__(self, sources: dict[str, str], lengths: np.ndarray):
        self._fds = {key: os.open(path, os.O_RDONLY) for key, path in sources.items()}
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]) * 4

    def read(self, key: str, index: int) -> np.ndarray:
        n = int(self.lengths[index]) * 4
        return np.frombuffer(os.pread(self._fds[key], n, int(self.offsets[index])), dtype=np.int32)

    def pack(self, indices: list[int], seq_length: int, pad_id: int, neat: bool) -> dict[str, np.ndarray]:
        seg = [int(self.lengths[i]) for i in indices]
        pad = seq_length - sum(seg)
        input_ids = np.concatenate([self.read("input_ids", i) for i in indices]
                                   + [np.full(pad, pad_id, dtype=np.int32)])
        labels = np.concatenate([self.read("labels", i) for i in indices]
                                + [np.full(pad, IGNORE_INDEX, dtype=np.int32)])
        if neat:
            mask = np.concatenate([np.repeat(np.arange(1, len(seg) + 1, dtype=np.int32), seg),
                                   np.zeros(pad, dtype=np.int32)])
        else:
            mask = np.ones(seq_length, dtype=np.int32)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
