"""Write one Megatron indexed dataset (``.bin`` + ``.idx``, int32), a chunk of sequences at a time.

The bytes are those of megatron-core's ``IndexedDatasetBuilder`` with ``add_item`` + ``end_document`` per
sequence (one document per sample, as MindSpeed-LLM writes them; a test checks the bytes are equal). The
.bin is raw int32 tokens; the .idx is written by megatron-core's own index writer. The bookkeeping is
kept in compact arrays (4 bytes per sequence) instead of the builder's Python lists, so memory stays flat
on millions of samples.
"""
from __future__ import annotations

import warnings
from array import array

import numpy as np


def output_prefix(prefix: str, key: str, kind: str) -> str:
    """MindSpeed-LLM's names: ``{prefix}_packed_{key}_document`` (SFT, pairwise), ``{prefix}_{key}_document``
    (pretraining text; key is the JSON key, usually ``text``)."""
    return f"{prefix}_{key}_document" if kind == "pretrain" else f"{prefix}_packed_{key}_document"


class IndexedDatasetWriter:
    def __init__(self, path_prefix: str):
        self.path_prefix = path_prefix
        self._bin = open(path_prefix + ".bin", "wb")
        self._lengths = array("i")

    def __len__(self) -> int:
        return len(self._lengths)

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append ``len(lengths)`` sequences whose tokens are concatenated in ``tokens``."""
        assert int(lengths.sum()) == tokens.size, "lengths must add up to the tokens"
        self._bin.write(np.ascontiguousarray(tokens, dtype=np.int32).tobytes())
        self._lengths.frombytes(np.ascontiguousarray(lengths, dtype=np.int32).tobytes())

    def finalize(self) -> None:
        with warnings.catch_warnings():  # megatron-core warns about training kernels (TE, apex) on import
            warnings.simplefilter("ignore")
            from megatron.core.datasets.indexed_dataset import _IndexWriter

        self._bin.close()
        lengths = np.frombuffer(self._lengths, dtype=np.int32)
        with _IndexWriter(self.path_prefix + ".idx", np.int32) as writer:
            writer.write(lengths, None, np.arange(len(lengths) + 1, dtype=np.int64))

    def close(self) -> None:
        self._bin.close()
