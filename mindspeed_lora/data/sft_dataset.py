"""The SFT training dataset: preprocess_data.py's indexed files, sample order, and micro-batches.

Files (MindSpeed-LLM layout, int32 Megatron IndexedDataset): ``{prefix}_packed_{key}_document.bin/.idx`` for
key in input_ids, attention_mask, labels. Labels are stored unshifted with -100 on prompt tokens; with
``--neat-pack`` attention_mask holds segment ids 1, 2, 3, ... (0 = padding).

Order: the samples are split into train / valid / test by ``--split`` weights in file order (as Megatron
does), then the training part is shuffled once per epoch with a generator seeded by (seed, epoch). The
sample at global position k of training is therefore a pure function of (seed, k): resuming at
``consumed_samples`` continues the exact stream, whatever the data-parallel size.

Micro-batches: global batch i holds positions [i*G, (i+1)*G); data-parallel rank r takes, for micro-batch m,
the M samples starting at i*G + m*M*D + r*M (Megatron's pretraining-sampler layout), so the set of
micro-batches of a step does not depend on the parallel layout.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from mindspeed_lora.errors import UserError

KEYS = ("input_ids", "attention_mask", "labels")
IGNORE_INDEX = -100
PAD_MULTIPLE = 8


def file_prefix(data_path: str, key: str) -> str:
    return f"{data_path}_packed_{key}_document"


def missing_files(data_path: str, keys=KEYS) -> list[str]:
    """The ``{prefix}_packed_{key}_document.bin/.idx`` files of ``keys`` that do not exist."""
    return [p + ext for key in keys for p in [file_prefix(data_path, key)] for ext in (".bin", ".idx")
            if not os.path.isfile(p + ext)]


def open_indexed(data_path: str, keys=KEYS) -> dict:
    """{key: megatron IndexedDataset} of one prefix; an unreadable file is a UserError naming it."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    parts = {}
    for key in keys:
        try:
            parts[key] = IndexedDataset(file_prefix(data_path, key))
        except Exception as e:  # megatron asserts on a bad header
            raise UserError(f"{file_prefix(data_path, key)}.idx: not a readable Megatron indexed dataset "
                            f"({e})") from e
    return parts


def check_data_prefix(data_path: str) -> None:
    """Refuse a ``--data-path`` whose six files are not all there (cheap: no file is opened)."""
    missing = missing_files(data_path)
    if missing:
        hint = ""
        if os.path.isfile(f"{data_path}_text_document.idx"):
            hint = " (found pretraining data {prefix}_text_document: --stage sft needs instruction data " \
                   "from preprocess_data.py with an instruction handler)"
        raise UserError(f"--data-path {data_path}: {', '.join(missing)} not found; expected the "
                        f"--output-prefix of preprocess_data.py{hint}")


class SFTIndexedDataset:
    """The three aligned indexed datasets of one ``--data-path`` prefix; ``ds[i]`` is a dict of int64 arrays."""

    def __init__(self, data_path: str):
        self.data_path = data_path
        check_data_prefix(data_path)
        self._parts = open_indexed(data_path)
        lengths = {key: np.asarray(ds.sequence_lengths) for key, ds in self._parts.items()}
        n = len(lengths["input_ids"])
        for key in KEYS[1:]:
            if len(lengths[key]) != n or not np.array_equal(lengths[key], lengths["input_ids"]):
                bad = n if len(lengths[key]) != n else int(np.flatnonzero(lengths[key] != lengths["input_ids"])[0])
                raise UserError(f"{file_prefix(data_path, key)}: does not line up with input_ids "
                                f"({len(lengths[key])} vs {n} samples; first mismatch at sample {bad})")
        if n == 0:
            raise UserError(f"--data-path {data_path}: the dataset holds no samples")
        self.lengths = lengths["input_ids"].astype(np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {key: np.asarray(ds[int(i)], dtype=np.int64) for key, ds in self._parts.items()}

    def check_fits(self, seq_length: int) -> None:
        """Refuse samples longer than ``seq_length`` (they would be cut, silently dropping targets)."""
        longest = int(self.lengths.max())
        if longest > seq_length:
            i = int(np.argmax(self.lengths))
            raise UserError(
                f"--data-path {self.data_path}: sample {i} has {longest} tokens, more than --seq-length "
                f"{seq_length}; preprocess with the same --seq-length (longer samples are then dropped) or "
                f"raise --seq-length"
            )

    def has_segment_ids(self) -> bool:
        """True when attention_mask holds neat-pack segment ids (some value above 1) in the first samples."""
        for i in range(min(len(self), 16)):
            if self[i]["attention_mask"].max(initial=0) > 1:
                return True
        return False


def split_counts(n: int, split: str) -> tuple[int, int, int]:
    """``--split`` weights "a,b,c" -> sample counts of train, valid, test.

    Megatron's rule: the parts are the ranges between round(cumulative fraction x n), in file order.
    """
    try:
        weights = [float(x) for x in split.replace("/", ",").split(",") if x.strip()]
    except ValueError as e:
        raise UserError(f"--split {split!r}: expected comma-separated numbers, e.g. 98,2,0") from e
    if not weights or len(weights) > 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"--split {split!r}: expected up to three non-negative weights with a positive sum")
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    cumulative = [0.0]
    for w in weights:
        cumulative.append(cumulative[-1] + w / total)
    bounds = [int(round(c * n)) for c in cumulative]
    return tuple(bounds[i + 1] - bounds[i] for i in range(3))  # type: ignore[return-value]


@dataclass(frozen=True)
class SampleOrder:
    """Which dataset sample sits at each global position of a split (epochs concatenated)."""

    indices: np.ndarray
    """Dataset indices of the split, in file order."""
    seed: int
    shuffle: bool

    def __len__(self) -> int:
        return len(self.indices)

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.indices))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.indices))

    def sample_at(self, positions: list[int]) -> list[int]:
        n = len(self.indices)
        out, cache = [], {}
        for k in positions:
            epoch, pos = divmod(k, n)
            if epoch not in cache:
                cache[epoch] = self.epoch_permutation(epoch)
            out.append(int(self.indices[cache[epoch][pos]]))
        return out


def split_orders(n: int, split: str, seed: int, shuffle: bool) -> tuple[SampleOrder, SampleOrder]:
    """Training order (shuffled per epoch) and validation order (file order)."""
    n_train, n_valid, _ = split_counts(n, split)
    idx = np.arange(n)
    return (SampleOrder(idx[:n_train], seed, shuffle), SampleOrder(idx[n_train:n_train + n_valid], seed, False))


def micro_batch_positions(start: int, global_batch: int, micro_batch: int, dp_size: int, dp_rank: int
                          ) -> list[list[int]]:
    """Global positions of each micro-batch of one data-parallel rank for the global batch at ``start``."""
    per_step = micro_batch * dp_size
    assert global_batch % per_step == 0, "validated in the training config"
    firsts = [start + m * per_step + dp_rank * micro_batch for m in range(global_batch // per_step)]
    return [list(range(f, f + micro_batch)) for f in firsts]


@dataclass(frozen=True)
class CollateOptions:
    seq_length: int
    pad_to_seq_length: bool = True
    """False: pad a micro-batch to its longest sample rounded up to ``multiple``."""
    multiple: int = PAD_MULTIPLE
    segments: str = "none"
    """none: causal attention over the whole row; ids: neat-pack segment ids in attention_mask;
    eod: a new segment after each ``eod_id`` token."""
    eod_id: int | None = None
    pad_id: int = 0


def _segment_ids(sample: dict[str, np.ndarray], opts: CollateOptions) -> np.ndarray | None:
    if opts.segments == "none":
        return None
    if opts.segments == "ids":
        return sample["attention_mask"]
    ids = sample["input_ids"]
    starts = np.zeros(len(ids), dtype=np.int64)
    starts[1:] = ids[:-1] == opts.eod_id
    seg = np.cumsum(starts) + 1
    return np.where(sample["attention_mask"] > 0, seg, 0)


def collate(samples: list[dict[str, np.ndarray]], opts: CollateOptions) -> dict[str, torch.Tensor]:
    """Samples -> one micro-batch for GPTModel.

    Returns tokens [b, s], position_ids [b, s], labels [b, s] (shifted: labels[t] is the target of token t;
    masked places hold 0), loss_mask [b, s] float (1 where a target exists), attention_mask (None for plain
    causal attention, else bool [b, 1, s, s] with True = masked: causal within a segment only), and
    ``segment_lengths`` (a list of token counts of each real sample/segment, for FLOP accounting).
    """
    longest = max(len(s["input_ids"]) for s in samples)
    if opts.pad_to_seq_length:
        length = opts.seq_length
    else:
        length = -(-longest // opts.multiple) * opts.multiple
    b = len(samples)
    tokens = np.full((b, length), opts.pad_id, dtype=np.int64)
    raw_labels = np.full((b, length), IGNORE_INDEX, dtype=np.int64)
    segments = np.zeros((b, length), dtype=np.int64) if opts.segments != "none" else None
    seg_lengths: list[int] = []
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        tokens[i, :n] = s["input_ids"]
        raw_labels[i, :n] = s["labels"]
        seg = _segment_ids(s, opts)
        if segments is not None:
            segments[i, :n] = seg
            ids, counts = np.unique(seg[seg > 0], return_counts=True)
            seg_lengths += [int(c) for c in counts]
        else:
            seg_lengths.append(n)
    shifted = np.full_like(raw_labels, IGNORE_INDEX)
    shifted[:, :-1] = raw_labels[:, 1:]
    if segments is not None:
        # the last token of a packed sample must not learn to predict the first token of the next one
        crosses = np.zeros_like(shifted, dtype=bool)
        crosses[:, :-1] = segments[:, 1:] != segments[:, :-1]
        shifted[crosses] = IGNORE_INDEX
    loss_mask = shifted != IGNORE_INDEX
    out = {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(np.where(loss_mask, shifted, 0)),
        "loss_mask": torch.from_numpy(loss_mask.astype(np.float32)),
        "attention_mask": None,
        "segment_lengths": seg_lengths,
    }
    if segments is None:
        out["position_ids"] = torch.arange(length).unsqueeze(0).expand(b, -1).contiguous()
        return out
    seg = torch.from_numpy(segments)
    positions = torch.zeros_like(seg)
    for i in range(b):
        starts = torch.ones(length, dtype=torch.bool)
        starts[1:] = seg[i, 1:] != seg[i, :-1]
        start_idx = torch.cummax(torch.where(starts, torch.arange(length), torch.zeros(length, dtype=torch.long)),
                                 dim=0).values
        positions[i] = torch.arange(length) - start_idx
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same = seg[:, :, None] == seg[:, None, :]
    out["position_ids"] = positions
    out["attention_mask"] = ~(same & causal).unsqueeze(1)
    return out
