"""TP shard rules: rank slices read from HF tensors merge back exactly, and match splitting the TP=1 layout."""
import pytest
import torch

from mindspeed_lora.checkpoint.sharding import interleave_qkv, merge_shards, read_shard, split_full, split_qkv
from mindspeed_lora.models.family import COLUMN, GATE_UP, QKV, REPLICATED, ROW, VOCAB

HEADS, GROUPS, HEAD_DIM, HIDDEN = 8, 4, 3, 10


def _reader(tensors, log=None):
    def read(name, dim, start, stop):
        if log is not None:
            log.append((name, dim, start, stop))
        t = tensors[name]
        if dim is None:
            return t.clone()
        return t.narrow(dim, start, stop - start).clone()
    return read


def _case(kind):
    g = torch.Generator().manual_seed(0)
    if kind == QKV:
        names = ("q", "k", "v")
        shapes = [(HEADS * HEAD_DIM, HIDDEN), (GROUPS * HEAD_DIM, HIDDEN), (GROUPS * HEAD_DIM, HIDDEN)]
    elif kind == GATE_UP:
        names, shapes = ("gate", "up"), [(16, HIDDEN), (16, HIDDEN)]
    elif kind == ROW:
        names, shapes = ("o",), [(HIDDEN, 16)]
    elif kind == REPLICATED:
        names, shapes = ("norm",), [(HIDDEN,)]
    else:
        names, shapes = ("w",), [(16, HIDDEN)]
    return names, shapes, {n: torch.randn(s, generator=g) for n, s in zip(names, shapes)}


KW = dict(num_heads=HEADS, num_groups=GROUPS, head_dim=HEAD_DIM)


@pytest.mark.parametrize("kind", [REPLICATED, VOCAB, COLUMN, ROW, QKV, GATE_UP])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_read_then_merge_round_trips(kind, tp):
    names, shapes, tensors = _case(kind)
    shards = [read_shard(kind, names, shapes, _reader(tensors), r, tp, **KW) for r in range(tp)]
    merged = merge_shards(kind, shards, **KW)
    for name, t in zip(names, merged):
        assert torch.equal(t, tensors[name])
    full = read_shard(kind, names, shapes, _reader(tensors), 0, 1, **KW)
    for r in range(tp):
        assert torch.equal(split_full(kind, full, tp, r), shards[r])


def test_qkv_layout_is_grouped_q_k_v():
    q = torch.arange(HEADS * HEAD_DIM).float().unsqueeze(1)
    k = 1000 + torch.arange(GROUPS * HEAD_DIM).float().unsqueeze(1)
    v = 2000 + torch.arange(GROUPS * HEAD_DIM).float().unsqueeze(1)
    fused = interleave_qkv(q, k, v, GROUPS)
    per_group = HEADS // GROUPS * HEAD_DIM
    # group 1 starts after group 0's q (per_group rows), k (HEAD_DIM rows) and v (HEAD_DIM rows)
    g1 = fused[per_group + 2 * HEAD_DIM:]
    assert torch.equal(g1[:per_group], q[per_group:2 * per_group])
    assert torch.equal(g1[per_group:per_group + HEAD_DIM], k[HEAD_DIM:2 * HEAD_DIM])
    assert torch.equal(g1[per_group + HEAD_DIM:per_group + 2 * HEAD_DIM], v[HEAD_DIM:2 * HEAD_DIM])
    back = split_qkv(fused, GROUPS, per_group, HEAD_DIM)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))


def test_gate_up_rank_holds_its_gate_then_up_block():
    names, shapes, tensors = _case(GATE_UP)
    shard = read_shard(GATE_UP, names, shapes, _reader(tensors), 1, 2, **KW)
    assert torch.equal(shard, torch.cat([tensors["gate"][8:], tensors["up"][8:]]))


def test_each_rank_reads_only_its_slices():
    names, shapes, tensors = _case(QKV)
    log = []
    read_shard(QKV, names, shapes, _reader(tensors, log), 1, 2, **KW)
    rows_q = HEADS // GROUPS * HEAD_DIM * GROUPS // 2
    assert log == [("q", 0, rows_q, 2 * rows_q), ("k", 0, 2 * HEAD_DIM, 4 * HEAD_DIM),
                   ("v", 0, 2 * HEAD_DIM, 4 * HEAD_DIM)]


def test_indivisible_tp_is_refused():
    names, shapes, tensors = _case(COLUMN)
    with pytest.raises(ValueError, match="not divisible"):
        read_shard(COLUMN, names, shapes, _reader(tensors), 0, 3, **KW)
