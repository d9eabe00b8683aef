"""Write HF safetensors tensor by tensor (sharded, with an index), plus config.json and tokenizer files.

The tensors to write are planned up front (name, shape, dtype, in file order), so each shard's header is
known before its first byte and every tensor goes to disk as soon as it is produced: memory holds one
tensor, never a shard. The format (``safetensors``): an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`` padded with spaces to a
multiple of 8, then the tensors' bytes back to back in header order.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass

import torch

INDEX_NAME = "model.safetensors.index.json"
HF_SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "added_tokens.json")
"""Files of an HF model directory besides config.json and the weights that a loader of the model reads."""

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty(0, dtype=self.dtype).element_size()


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    t = text.strip().lower()
    for unit, mult in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def _write_tensor(f, t: torch.Tensor) -> None:
    f.write(memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy()))


class SafetensorsWriter:
    """Safetensors files for a planned list of tensors, split into shards of at most ``max_shard_bytes``.

    ``write(name, tensor)`` must follow the plan's order; a shard file is closed as soon as its last tensor is
    written. With one shard and ``single_name`` set, that file is named ``single_name`` (PEFT adapters);
    otherwise files are ``{prefix}-0000i-of-0000n.safetensors``.
    """

    def __init__(self, out_dir: str, plan: list[TensorPlan], max_shard_bytes: int = 5 * 10**9,
                 prefix: str = "model", single_name: str | None = None, metadata: dict | None = None):
        self.out_dir = out_dir
        self.plan = plan
        self.metadata = {"format": "pt", **(metadata or {})}
        shards: list[list[TensorPlan]] = []
        size = 0
        for p in plan:
            if p.dtype not in _ST_DTYPES:
                raise ValueError(f"{p.name}: dtype {p.dtype} has no safetensors name")
            if not shards or (size + p.nbytes > max_shard_bytes and shards[-1]):
                shards.append([])
                size = 0
            shards[-1].append(p)
            size += p.nbytes
        n = len(shards)
        names = [single_name] if n == 1 and single_name else \
            [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.files = list(zip(names, shards))
        self.weight_map = {p.name: fname for fname, ps in self.files for p in ps}
        self.total_size = sum(p.nbytes for p in plan)
        self._next = 0  # index into plan
        self._shard = -1
        self._left_in_shard = 0
        self._f = None

    def _open_next_shard(self) -> None:
        self._shard += 1
        fname, ps = self.files[self._shard]
        header: dict = {"__metadata__": self.metadata}
        offset = 0
        for p in ps:
            header[p.name] = {"dtype": _ST_DTYPES[p.dtype], "shape": list(p.shape),
                              "data_offsets": [offset, offset + p.nbytes]}
            offset += p.nbytes
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)
        self._f = open(os.path.join(self.out_dir, fname), "wb")
        self._f.write(struct.pack("<Q", len(text)))
        self._f.write(text)
        self._left_in_shard = len(ps)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.write_parts(name, [tensor])

    def write_parts(self, name: str, parts) -> None:
        """Write the tensor ``torch.cat(parts, dim=0)`` without building it: its row blocks, one at a time."""
        if self._next >= len(self.plan):
            raise AssertionError(f"{name}: every planned tensor is already written")
        p = self.plan[self._next]
        if name != p.name:
            raise AssertionError(f"wrote {name}; planned {p.name}")
        if self._left_in_shard == 0:
            self._open_next_shard()
        rows = 0
        for t in parts:
            if tuple(t.shape[1:]) != p.shape[1:] or t.dtype != p.dtype:
                raise AssertionError(f"{name}: part {tuple(t.shape)} {t.dtype} does not fit {p.shape} {p.dtype}")
            _write_tensor(self._f, t)
            rows += t.shape[0] if t.dim() else 1
            del t  # before the next part is produced: one part in memory at a time
        if rows != (p.shape[0] if p.shape else 1):
            raise AssertionError(f"{name}: wrote {rows} rows of {p.shape}")
        self._next += 1
        self._left_in_shard -= 1
        if self._left_in_shard == 0:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None

    def close(self) -> None:
        if self._next != len(self.plan):
            missing = self.plan[self._next].name
            raise AssertionError(f"{len(self.plan) - self._next} planned tensors never written (first: {missing})")

    def write_index(self) -> None:
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        with open(os.path.join(self.out_dir, INDEX_NAME), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
            f.write("\n")


def write_hf_config(out_dir: str, config: dict, dtype_name: str) -> None:
    """config.json with the dtype of the weights written beside it (both the old and the new key name)."""
    cfg = dict(config)
    cfg["dtype"] = dtype_name
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = dtype_name
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def copy_side_files(src_dir: str, dst_dir: str) -> list[str]:
    """Copy the tokenizer and generation files of an HF directory (those that exist); returns their names."""
    copied = []
    for name in HF_SIDE_FILES:
        src = os.path.join(src_dir, name)
        if os.path.isfile(src):
            shutil.copy2(src, os.path.join(dst_dir, name))
            copied.append(name)
    return copied
