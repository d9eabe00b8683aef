"""The SFT dataset: files, split, sample order, micro-batch layout, and collation (shift, masks, positions)."""
import numpy as np
import pytest
import torch

from mindspeed_lora.data.sft_dataset import (
    CollateOptions,
    SampleOrder,
    SFTIndexedDataset,
    collate,
    micro_batch_positions,
    split_counts,
    split_orders,
)
from mindspeed_lora.errors import UserError
from tests import training_fixtures as fx


def _sample(ids, labels, mask=None):
    ids = np.asarray(ids)
    return {"input_ids": ids, "labels": np.asarray(labels),
            "attention_mask": np.asarray(mask) if mask is not None else np.ones(len(ids), dtype=np.int64)}


def test_labels_are_shifted_and_masked_where_minus_100():
    b = collate([_sample([5, 6, 7, 8], [-100, -100, 7, 8])], CollateOptions(seq_length=6))
    assert b["tokens"].tolist() == [[5, 6, 7, 8, 0, 0]]
    # target of token t is the label of token t+1; pads and prompt tokens carry no target
    assert b["loss_mask"].tolist() == [[0, 1, 1, 0, 0, 0]]
    assert b["labels"].tolist() == [[0, 7, 8, 0, 0, 0]]
    assert b["attention_mask"] is None
    assert b["position_ids"].tolist() == [list(range(6))]
    assert b["segment_lengths"] == [4]


def test_variable_lengths_pad_to_a_multiple_of_8_not_seq_length():
    samples = [_sample(range(1, 12), [1] * 11), _sample([1, 2, 3], [1, 2, 3])]
    b = collate(samples, CollateOptions(seq_length=64, pad_to_seq_length=False))
    assert b["tokens"].shape == (2, 16)
    assert collate(samples, CollateOptions(seq_length=64))["tokens"].shape == (2, 64)
    assert collate([_sample(range(1, 17), [1] * 16)], CollateOptions(seq_length=64, pad_to_seq_length=False,
                                                                     multiple=8))["tokens"].shape == (1, 16)


def test_neat_pack_segments_block_attention_restart_positions_and_cut_cross_targets():
    # two packed samples (ids 1 and 2) and padding (0)
    s = _sample([11, 12, 13, 21, 22, 0, 0, 0], [-100, 12, 13, 21, 22, -100, -100, -100],
                mask=[1, 1, 1, 2, 2, 0, 0, 0])
    b = collate([s], CollateOptions(seq_length=8, segments="ids"))
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    seg = torch.tensor([1, 1, 1, 2, 2, 0, 0, 0])
    allowed = (seg[:, None] == seg[None, :]) & torch.ones(8, 8, dtype=torch.bool).tril()
    assert torch.equal(b["attention_mask"], ~allowed[None, None])  # True = masked (megatron's convention)
    # token 13 (last of sample 1) would predict 21 (first of sample 2): cut
    assert b["loss_mask"].tolist() == [[1, 1, 0, 1, 0, 0, 0, 0]]
    assert b["labels"][0, :2].tolist() == [12, 13]
    assert b["segment_lengths"] == [3, 2]


def test_reset_attention_on_plain_packs_splits_after_end_of_document():
    s = _sample([11, 12, 2, 21, 2, 0], [11, 12, 2, 21, 2, -100], mask=[1, 1, 1, 1, 1, 0])
    b = collate([s], CollateOptions(seq_length=6, segments="eod", eod_id=2))
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    assert b["segment_lengths"] == [3, 2]
    assert bool(b["attention_mask"][0, 0, 3, 2])  # the second document does not see the first


@pytest.mark.parametrize("split", ["100,0,0", "98,2,0", "1,1,1", "90,5,5", "3,1", "0.7,0.2,0.1"])
@pytest.mark.parametrize("n", [1, 7, 10, 101, 1000])
def test_split_matches_megatron(split, n):
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    want = tuple(0 if m is None else int(round(m[1] * n)) - int(round(m[0] * n)) for m in matrix)
    assert split_counts(n, split) == want


@pytest.mark.parametrize("bad", ["", "a,b", "-1,2", "0,0,0", "1,1,1,1"])
def test_bad_split_refused(bad):
    with pytest.raises(UserError, match="--split"):
        split_counts(10, bad)


def test_sample_order_is_a_reshuffle_per_epoch_and_a_function_of_the_seed():
    order = SampleOrder(np.arange(10, 20), seed=5, shuffle=True)
    first, second = order.sample_at(list(range(10))), order.sample_at(list(range(10, 20)))
    assert sorted(first) == sorted(second) == list(range(10, 20))
    assert first != second and first != list(range(10, 20))
    assert SampleOrder(np.arange(10, 20), seed=5, shuffle=True).sample_at([13, 3]) == [second[3], first[3]]
    assert SampleOrder(np.arange(10, 20), seed=6, shuffle=True).sample_at(list(range(10))) != first
    assert SampleOrder(np.arange(10, 20), seed=5, shuffle=False).sample_at([0, 11]) == [10, 11]
    train, valid = split_orders(10, "8,2,0", seed=1, shuffle=True)
    assert sorted(train.indices.tolist()) == list(range(8)) and valid.indices.tolist() == [8, 9]


def test_micro_batches_are_the_same_set_for_any_data_parallel_size():
    def layout(dp):
        return sorted(tuple(mb) for r in range(dp) for mb in micro_batch_positions(40, 8, 2, dp, r))

    assert layout(1) == layout(2) == layout(4)
    assert micro_batch_positions(40, 8, 2, 2, 1) == [[42, 43], [46, 47]]  # megatron's sampler layout


def test_dataset_reads_files_and_refuses_bad_ones(tmp_path):
    samples = fx.toy_samples(5)
    prefix = fx.write_sft_data(str(tmp_path / "d"), samples)
    ds = SFTIndexedDataset(prefix)
    assert len(ds) == 5
    for i, s in enumerate(samples):
        for k in s:
            assert ds[i][k].tolist() == s[k].tolist()
    ds.check_fits(64)
    with pytest.raises(UserError, match=r"sample \d+ has \d+ tokens, more than --seq-length 8"):
        ds.check_fits(8)
    with pytest.raises(UserError, match="d2_packed_input_ids_document.bin.*preprocess_data.py"):
        SFTIndexedDataset(str(tmp_path / "d2"))
    # labels of another dataset: refused with the first sample that disagrees
    other = fx.toy_samples(5, seed=9, min_prompt=20, max_prompt=20)
    fx.write_sft_data(str(tmp_path / "o"), other)
    for ext in (".bin", ".idx"):
        (tmp_path / f"d_packed_labels_document{ext}").write_bytes(
            (tmp_path / f"o_packed_labels_document{ext}").read_bytes())
    with pytest.raises(UserError, match="labels_document: does not line up with input_ids"):
        SFTIndexedDataset(prefix)
