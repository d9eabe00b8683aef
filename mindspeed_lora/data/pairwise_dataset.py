"""The DPO training dataset: preprocess_data.py's pairwise files, and micro-batches holding whole pairs.

Files (MindSpeed-LLM layout, int32 Megatron IndexedDataset): ``{prefix}_packed_{key}_document.bin/.idx`` for
key in chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels; labels unshifted, -100 on prompt
tokens. Sample order, train/valid split, epochs and the data-parallel micro-batch layout are the SFT
dataset's (``sft_dataset``): one pair counts as one sample of ``--global-batch-size`` / ``--micro-batch-size``.

A micro-batch of M pairs is one forward of 2M rows: the M chosen sequences, then the M rejected ones, so the
policy (and reference) log-probs of both sides of a pair come from the same forward.
"""
from __future__ import annotations

import os

import numpy as np

from mindspeed_lora.data.sft_dataset import CollateOptions, collate, file_prefix
from mindspeed_lora.errors import UserError

SIDES = ("chosen", "rejected")
KEYS = tuple(f"{side}_{part}" for side in SIDES for part in ("input_ids", "labels"))


def check_pairwise_prefix(data_path: str) -> None:
    """Refuse a ``--data-path`` whose eight pairwise files are not all there (no file is opened)."""
    missing = [p + ext for key in KEYS for p in [file_prefix(data_path, key)] for ext in (".bin", ".idx")
               if not os.path.isfile(p + ext)]
    if missing:
        hint = ""
        if os.path.isfile(file_prefix(data_path, "input_ids") + ".idx"):
            hint = " (found SFT data {prefix}_packed_input_ids_document: --stage dpo needs preference data " \
                   "from preprocess_data.py with a pairwise handler, e.g. AlpacaStylePairwiseHandler)"
        raise UserError(f"--data-path {data_path}: {', '.join(missing)} not found; expected the "
                        f"--output-prefix of preprocess_data.py on preference data{hint}")


class PairwiseIndexedDataset:
    """The four aligned indexed datasets of one prefix; ``ds[i]`` is {chosen: sample, rejected: sample}, each
    sample a dict of int64 arrays input_ids / labels (what ``sft_dataset.collate`` takes)."""

    def __init__(self, data_path: str):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.data_path = data_path
        check_pairwise_prefix(data_path)
        self._parts = {}
        for key in KEYS:
            try:
                self._parts[key] = IndexedDataset(file_prefix(data_path, key))
            except Exception as e:  # megatron asserts on a bad header
                raise UserError(f"{file_prefix(data_path, key)}.idx: not a readable Megatron indexed dataset "
                                f"({e})") from e
        lengths = {key: np.asarray(ds.sequence_lengths, dtype=np.int64) for key, ds in self._parts.items()}
        n = len(lengths["chosen_input_ids"])
        for side in SIDES:
            ids, labels = lengths[f"{side}_input_ids"], lengths[f"{side}_labels"]
            if len(ids) != n or len(labels) != n or not np.array_equal(ids, labels):
                other = f"{side}_labels" if len(ids) == n else f"{side}_input_ids"
                raise UserError(f"{file_prefix(data_path, other)}: does not line up with chosen_input_ids "
                                f"({len(lengths[other])} vs {n} samples, or different lengths)")
        if n == 0:
            raise UserError(f"--data-path {data_path}: the dataset holds no preference pairs")
        self.chosen_lengths = lengths["chosen_input_ids"]
        self.rejected_lengths = lengths["rejected_input_ids"]
        self.lengths = np.maximum(self.chosen_lengths, self.rejected_lengths)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, dict[str, np.ndarray]]:
        return {side: {part: np.asarray(self._parts[f"{side}_{part}"][int(i)], dtype=np.int64)
                       for part in ("input_ids", "labels")} for side in SIDES}

    def check_fits(self, seq_length: int) -> None:
        """Refuse a chosen or rejected sequence longer than ``seq_length`` (cutting it would change its log-prob)."""
        longest = int(self.lengths.max())
        if longest > seq_length:
            i = int(np.argmax(self.lengths))
            raise UserError(f"--data-path {self.data_path}: pair {i} has a sequence of {longest} tokens, more than "
                            f"--seq-length {seq_length}; preprocess with the same --seq-length or raise it")

    def has_segment_ids(self) -> bool:
        return False  # pairwise files carry no attention_mask: never packed


def collate_pairs(pairs: list[dict], opts: CollateOptions) -> dict:
    """M pairs -> one micro-batch of 2M rows (chosen rows 0..M-1, rejected rows M..2M-1), see ``collate``;
    adds ``pairs`` = M."""
    if opts.segments != "none":
        raise UserError("pairwise data is not packed: --neat-pack / --reset-attention-mask do not apply to --stage dpo")
    rows = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    batch = collate(rows, opts)
    batch["pairs"] = len(pairs)
    return batch
