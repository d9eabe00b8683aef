"""Read HF safetensors checkpoints tensor by tensor, slice by slice (never the whole model at once)."""
from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open

from mindspeed_lora.errors import UserError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class HFCheckpointReader:
    """Tensor names, shapes and sliced reads of an HF model dir (one file or a sharded index)."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        index = os.path.join(model_dir, INDEX_NAME)
        single = os.path.join(model_dir, SINGLE_NAME)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise UserError(f"{index}: expected JSON with a 'weight_map' object ({e})") from e
        elif os.path.isfile(single):
            weight_map = None
        else:
            raise UserError(f"{model_dir}: neither {INDEX_NAME} nor {SINGLE_NAME} found")
        self._handles: dict[str, object] = {}
        if weight_map is None:
            handle = self._open(SINGLE_NAME)
            weight_map = {k: SINGLE_NAME for k in handle.keys()}
        else:
            for fname in sorted(set(weight_map.values())):
                handle = self._open(fname)
                present = set(handle.keys())
                missing = [k for k, v in weight_map.items() if v == fname and k not in present]
                if missing:
                    path = os.path.join(model_dir, fname)
                    raise UserError(f"{path}: tensor {missing[0]!r} listed in the index is missing")
        self.weight_map: dict[str, str] = weight_map

    def _open(self, fname: str):
        if fname not in self._handles:
            path = os.path.join(self.model_dir, fname)
            if not os.path.isfile(path):
                raise UserError(f"{path}: shard listed in {INDEX_NAME} is missing")
            try:
                self._handles[fname] = safe_open(path, framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
                raise UserError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
        return self._handles[fname]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _slice(self, name: str):
        if name not in self.weight_map:
            raise UserError(f"{self.model_dir}: tensor {name!r} not found in the checkpoint")
        return self._open(self.weight_map[name]).get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype_name(self, name: str) -> str:
        return self._slice(name).get_dtype()

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        """The tensor, or its [start, stop) block along ``dim``; only those bytes are read."""
        sl = self._slice(name)
        try:
            if dim is None:
                t = sl[:]
            elif dim == 0:
                t = sl[start:stop]
            elif dim == 1:
                t = sl[:, start:stop]
            else:
                raise ValueError(f"slicing along dim {dim} is not supported")
        except Exception as e:
            if isinstance(e, ValueError):
                raise
            path = os.path.join(self.model_dir, self.weight_map[name])
            raise UserError(f"{path}: cannot read tensor {name!r} (truncated file?): {e}") from e
        return t.contiguous()
