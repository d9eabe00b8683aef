"""TensorMemo: the per-step memo of derived tables (rope cos/sin, packed lengths)."""
import gc

import torch

from mindspeed_lora.ops.dispatch import TensorMemo


def counting(memo: TensorMemo):
    calls = []

    def get(*tensors, extra=None):
        def compute():
            calls.append(len(tensors))  # not the tensors: the memo must not be what keeps them alive
            return object()
        return memo.get(tensors, extra, compute)

    return get, calls


def test_same_tensors_computed_once_changed_or_new_tensors_recomputed():
    get, calls = counting(TensorMemo())
    a = torch.zeros(3)
    first = get(a, None)
    assert get(a, None) is first and len(calls) == 1
    assert get(a, None, extra=2) is not first and len(calls) == 2  # other extra key
    a.add_(1)  # in place: the derived value is stale
    assert get(a, None) is not first and len(calls) == 3
    assert get(torch.zeros(3), None) and len(calls) == 4  # equal values, another tensor


def test_alternating_keys_keep_their_values_until_slots_run_out():
    get, calls = counting(TensorMemo(slots=2))
    a, b, c = torch.zeros(1), torch.zeros(1), torch.zeros(1)
    va, vb = get(a), get(b)
    for _ in range(3):  # two models in turn: no recomputation
        assert get(a) is va and get(b) is vb
    assert len(calls) == 2
    get(c)  # a third key drops the least recently used (a)
    assert get(b) is vb and len(calls) == 3
    assert get(a) is not va and len(calls) == 4


def test_entries_of_dead_tensors_are_dropped():
    memo = TensorMemo(slots=4)
    get, _ = counting(memo)
    a = torch.zeros(1)
    get(a)
    del a
    gc.collect()
    get(torch.ones(1))
    assert len(memo._entries) == 1
