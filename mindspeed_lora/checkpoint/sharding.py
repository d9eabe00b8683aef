"""Tensor-parallel shard rules between HF tensors and megatron-core tensors, one small transform per kind.

Layouts (n = rows of the HF tensor, t = TP size, r = rank):

  replicated   every rank holds the full tensor (norm weights)
  vocab/column rank r holds rows [r*n/t, (r+1)*n/t)
  row          rank r holds columns [r*c/t, (r+1)*c/t)
  qkv          megatron's fused QKV, grouped by query group g (G groups, p = heads per group, d = head dim):
                   [ q_g0 (p*d rows) | k_g0 (d) | v_g0 (d) | q_g1 | k_g1 | v_g1 | ... ]
               rank r holds the contiguous groups [r*G/t, (r+1)*G/t) -- so it reads only those rows of
               HF q_proj, k_proj and v_proj. Biases follow the same row layout.
  gate_up      megatron's linear_fc1 on rank r is [gate_r ; up_r], each half the r-th row block of the HF
               gate_proj / up_proj (so the full fc1 is NOT [gate; up] split in t).

``read_shard`` builds rank r's tensor by reading only the slices it needs through a ``reader(name, dim,
start, stop)``; ``merge_shards`` inverts it from all ranks' tensors back to the HF tensors.
"""
from __future__ import annotations

from typing import Callable

import torch

from mindspeed_lora.models.family import COLUMN, GATE_UP, QKV, REPLICATED, ROW, VOCAB

# reader(name, dim, start, stop) -> tensor; dim=None reads the whole tensor
SliceReader = Callable[[str, "int | None", int, int], torch.Tensor]


def _block(n: int, tp: int, rank: int, what: str) -> tuple[int, int]:
    if n % tp:
        raise ValueError(f"{what}: size {n} is not divisible by tensor-parallel size {tp}")
    size = n // tp
    return rank * size, (rank + 1) * size


def qkv_group_sizes(num_heads: int, num_groups: int, head_dim: int) -> tuple[int, int]:
    """(rows of q per group, rows of k or v per group)."""
    return num_heads // num_groups * head_dim, head_dim


def read_shard(
    kind: str,
    hf_names: tuple[str, ...],
    shapes: list[tuple[int, ...]],
    reader: SliceReader,
    tp_rank: int,
    tp_size: int,
    *,
    num_heads: int = 0,
    num_groups: int = 0,
    head_dim: int = 0,
) -> torch.Tensor:
    """Rank ``tp_rank``'s megatron tensor for one weight rule, reading only the needed slices."""
    name = hf_names[0]
    if kind == REPLICATED:
        return reader(name, None, 0, 0)
    if kind in (VOCAB, COLUMN):
        a, b = _block(shapes[0][0], tp_size, tp_rank, name)
        return reader(name, 0, a, b)
    if kind == ROW:
        a, b = _block(shapes[0][1], tp_size, tp_rank, name)
        return reader(name, 1, a, b)
    if kind == GATE_UP:
        gate, up = hf_names
        a, b = _block(shapes[0][0], tp_size, tp_rank, gate)
        return torch.cat([reader(gate, 0, a, b), reader(up, 0, a, b)], dim=0)
    if kind == QKV:
        q_name, k_name, v_name = hf_names
        g0, g1 = _block(num_groups, tp_size, tp_rank, f"{q_name} query groups")
        q_rows, kv_rows = qkv_group_sizes(num_heads, num_groups, head_dim)
        q = reader(q_name, 0, g0 * q_rows, g1 * q_rows)
        k = reader(k_name, 0, g0 * kv_rows, g1 * kv_rows)
        v = reader(v_name, 0, g0 * kv_rows, g1 * kv_rows)
        return interleave_qkv(q, k, v, g1 - g0)
    raise ValueError(f"unknown shard kind {kind!r}")


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """[q; k; v] (HF row order) -> [q_g | k_g | v_g] per group (megatron row order)."""
    rest = q.shape[1:]
    qg = q.reshape(groups, -1, *rest)
    kg = k.reshape(groups, -1, *rest)
    vg = v.reshape(groups, -1, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


def split_qkv(fused: torch.Tensor, groups: int, q_rows: int, kv_rows: int):
    """Inverse of ``interleave_qkv``: megatron [q_g | k_g | v_g]* -> (q, k, v) in HF row order."""
    rest = fused.shape[1:]
    per = fused.reshape(groups, q_rows + 2 * kv_rows, *rest)
    q, k, v = torch.split(per, [q_rows, kv_rows, kv_rows], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def merge_shards(
    kind: str,
    shards: list[torch.Tensor],
    *,
    num_heads: int = 0,
    num_groups: int = 0,
    head_dim: int = 0,
) -> list[torch.Tensor]:
    """All TP ranks' tensors of one rule (rank order) -> the HF tensors of that rule (rule order)."""
    if kind == REPLICATED:
        return [shards[0]]
    if kind in (VOCAB, COLUMN):
        return [torch.cat(shards, dim=0)]
    if kind == ROW:
        return [torch.cat(shards, dim=1)]
    if kind == GATE_UP:
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves], dim=0), torch.cat([h[1] for h in halves], dim=0)]
    if kind == QKV:
        q_rows, kv_rows = qkv_group_sizes(num_heads, num_groups, head_dim)
        local_groups = num_groups // len(shards)
        parts = [split_qkv(s, local_groups, q_rows, kv_rows) for s in shards]
        return [torch.cat([p[i] for p in parts], dim=0) for i in range(3)]
    raise ValueError(f"unknown shard kind {kind!r}")


def split_full(kind: str, full: torch.Tensor, tp_size: int, tp_rank: int) -> torch.Tensor:
    """Rank ``tp_rank``'s slice of a full megatron-layout tensor (TP=1 layout) for resharding mg -> mg."""
    if kind == REPLICATED:
        return full
    if kind in (VOCAB, COLUMN, QKV):  # qkv groups are contiguous, so a row block is whole groups
        return full.chunk(tp_size, dim=0)[tp_rank]
    if kind == ROW:
        return full.chunk(tp_size, dim=1)[tp_rank]
    if kind == GATE_UP:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], dim=0)
    raise ValueError(f"unknown shard kind {kind!r}")
