"""preprocess_data internals against oracles: megatron-core's own dataset builder (bytes), HF tokenizers
(ids), HF apply_chat_template (ids and masks), a straight re-statement of MindSpeed-LLM's knapsack (packs),
and the run itself with other worker counts (bytes)."""
from __future__ import annotations

import bisect
import filecmp
import json
import os

import numpy as np
import pytest

from mindspeed_lora.data import readers
from mindspeed_lora.data.packing import greedy_knapsack
from tests.unit.test_preprocess import decoded, preprocess, read_key, spans, write_rows


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from mindspeed_lora.tiny import build_tokenizer

    d = str(tmp_path_factory.mktemp("tok"))
    build_tokenizer(d)
    return d


def test_writer_bytes_equal_megatron_builder(tmp_path):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    from mindspeed_lora.data.indexed_writer import IndexedDatasetWriter

    rng = np.random.default_rng(0)
    seqs = [rng.integers(-100, 500, size=n).astype(np.int32) for n in rng.integers(1, 50, size=40)]
    ref = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.int32)
    for s in seqs:
        ref.add_item(torch.from_numpy(s))
        ref.end_document()
    ref.finalize(str(tmp_path / "ref.idx"))
    ours = IndexedDatasetWriter(str(tmp_path / "ours"))
    for part in (seqs[:7], seqs[7:8], seqs[8:]):  # chunks of any size
        ours.add(np.concatenate(part), np.array([len(s) for s in part], dtype=np.int32))
    ours.finalize()
    for ext in (".bin", ".idx"):
        assert filecmp.cmp(tmp_path / f"ref{ext}", tmp_path / f"ours{ext}", shallow=False)
    ds = IndexedDataset(str(tmp_path / "ours"))
    assert all((np.asarray(ds[i]) == s).all() for i, s in enumerate(seqs))


def test_encoder_equals_hf_encode(tok_dir):
    from transformers import AutoTokenizer

    from mindspeed_lora.data.encoder import TextEncoder, tokenizer_spec

    hf = AutoTokenizer.from_pretrained(tok_dir)
    spec = tokenizer_spec(hf, tok_dir, True)
    texts = ["", " ", "a", " leading space", "trailing space ", "\n\nnew\nlines\n", "你好，世界", "x<|im_end|>\n",
             "has <|endoftext|> inside", "  two  spaces  ", "tab\tand\r\n", "1234567", "<think>\n\n</think>\n\n"] * 11
    got = TextEncoder(spec).encode(texts)
    assert got == [hf.encode(t, add_special_tokens=False) for t in texts]
    assert TextEncoder(spec).encode_documents(texts[:5]) == [hf.encode(t) for t in texts[:5]]


def test_chatml_ids_and_masks_equal_hf_apply_chat_template(tmp_path, tok_dir):
    """HF's own renderer with an equivalent Jinja template is the oracle for ids and trained positions."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok_dir)
    hf.chat_template = (  # HF renders with trim_blocks, so newlines are written as expressions
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}"
        "{% endgeneration %}{% if not loop.last %}{{ '\\n' }}{% endif %}{% else %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% if m['role'] == 'user' %}{{ '<|im_start|>assistant\\n' }}{% endif %}{% endif %}{% endfor %}")
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
                          {"role": "assistant", "content": "4."}, {"role": "user", "content": "北京在哪里？"},
                          {"role": "assistant", "content": "中国。 It is in China."}]},
            {"messages": [{"role": "user", "content": " spaces  around "}, {"role": "assistant", "content": "ok\n"}]}]
    preprocess(tmp_path, rows, "OpenAIInstructionHandler", tok_dir, "chatml")
    ids = read_key(str(tmp_path / "out" / "ds"), "input_ids")
    labels = read_key(str(tmp_path / "out" / "ds"), "labels")
    for row, x, y in zip(rows, ids, labels):
        ref = hf.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
        assert x.tolist() == ref["input_ids"]
        assert (y != -100).astype(int).tolist() == ref["assistant_masks"]


def mindspeed_knapsack(lengths, capacity):
    """MindSpeed-LLM's packing restated plainly: sorted lengths, pop the largest that fits; the sample for a
    length is the last one seen with that length."""
    numbers = sorted(lengths)
    by_length = {}
    for i, n in enumerate(lengths):
        by_length.setdefault(n, []).append(i)
    packs = []
    while numbers:
        pack, room = [], capacity
        while True:
            k = bisect.bisect(numbers, room) - 1
            if k < 0:
                break
            room -= numbers[k]
            pack.append(by_length[numbers.pop(k)].pop())
        packs.append(pack)
    return packs


def test_greedy_knapsack_matches_mindspeed():
    rng = np.random.default_rng(1)
    for capacity, n in ((31, 200), (100, 1000), (7, 50)):
        lengths = rng.integers(1, capacity + 1, size=n)
        assert list(greedy_knapsack(lengths, capacity)) == mindspeed_knapsack(lengths.tolist(), capacity)


@pytest.mark.parametrize("neat", [False, True])
def test_packing(tmp_path, tok_dir, neat):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    rows = [{"instruction": f"Q{i}", "output": "A" * (i % 5 + 1)} for i in range(12)]
    rows.append({"instruction": "long", "output": "word " * 60})
    preprocess(tmp_path, rows, "AlpacaStyleInstructionHandler", tok_dir, "empty")
    singles = decoded(tmp_path, tok_dir)
    lengths = [len(x) for x in read_key(str(tmp_path / "out" / "ds"), "input_ids")]
    seq = 24
    summary = preprocess(tmp_path, rows, "AlpacaStyleInstructionHandler", tok_dir, "empty", seq_length=seq,
                         pack=True, neat_pack=neat)
    assert summary["dropped"] == {"longer than the pack capacity 23 (--seq-length - 1)": 1}
    kept = [i for i, n in enumerate(lengths) if n <= seq - 1]
    packs = mindspeed_knapsack([lengths[i] for i in kept], seq - 1)
    prefix = str(tmp_path / "out" / "ds")
    ids, labels, masks = (read_key(prefix, k) for k in ("input_ids", "labels", "attention_mask"))
    assert summary["packs_written"] == len(packs) == len(ids)
    for pack, x, y, m in zip(packs, ids, labels, masks):
        assert len(x) == len(y) == len(m) == seq
        members = [kept[j] for j in pack]
        used = sum(lengths[i] for i in members)
        assert tok.decode(x[:used].tolist()) == "".join(singles[i]["text"] for i in members)
        assert (x[used:] == tok.pad_token_id).all() and (y[used:] == -100).all()
        trained = [tok.decode(y[a:b].tolist()) for a, b in spans(y)]
        assert trained == [t for i in members for t in singles[i]["trained"]]
        if neat:
            expect = np.concatenate([np.full(lengths[i], k + 1) for k, i in enumerate(members)]
                                    + [np.zeros(seq - used)])
            assert (m == expect).all()
        else:
            assert (m == 1).all()


def test_pad_to_multiple_of(tmp_path, tok_dir):
    rows = [{"instruction": "Q", "output": "A" * n} for n in range(1, 8)]
    preprocess(tmp_path, rows, "AlpacaStyleInstructionHandler", tok_dir, "chatml", pad_to_multiple_of=4)
    prefix = str(tmp_path / "out" / "ds")
    for x, y, m in zip(*(read_key(prefix, k) for k in ("input_ids", "labels", "attention_mask"))):
        assert len(x) % 4 == 0
        pad = int((m == 0).sum())
        assert pad < 4 and (m[:len(m) - pad] == 1).all() and (y[len(y) - pad:] == -100).all()
    summary = preprocess(tmp_path, rows, "AlpacaStyleInstructionHandler", tok_dir, "chatml", pad_to_multiple_of=4,
                         seq_length=30, neat_pack=True)
    for m in read_key(prefix, "attention_mask"):  # every segment keeps its padding: boundaries on multiples of 4
        ids, counts = np.unique(m[m > 0], return_counts=True)
        assert (counts % 4 == 0).all()
    assert summary["packs_written"] >= 1


def test_workers_give_identical_bytes(tmp_path, tok_dir):
    rng = np.random.default_rng(0)
    words = ["cat", "dog", "猫", "狗", "hello", "world", "1", "2"]
    rows = [{"conversations": [{"from": "human", "value": " ".join(rng.choice(words, rng.integers(1, 12)))},
                               {"from": "gpt", "value": " ".join(rng.choice(words, rng.integers(1, 30)))}]}
            for _ in range(1300)]
    src = tmp_path / "data.jsonl"
    write_rows(src, rows)
    with open(src, "ab") as f:
        f.write(b"{broken\n")  # skipped bad samples must not change the order either
    from mindspeed_lora.data.preprocess import PreprocessConfig, run_preprocess

    outputs = {}
    for workers in (1, 2, 4):
        out = tmp_path / f"w{workers}"
        for pack in (False, True) if workers != 2 else (False,):
            run_preprocess(PreprocessConfig(
                input=str(src), output_prefix=str(out / f"p{int(pack)}"), workers=workers,
                handler_name="SharegptStyleInstructionHandler", tokenizer_name_or_path=tok_dir, prompt_type="qwen3",
                seq_length=64, pack=pack, neat_pack=pack, skip_bad_samples=True, progress=False))
        outputs[workers] = out
    files = sorted(f for f in os.listdir(outputs[1]) if f.endswith((".bin", ".idx")))
    assert len(files) == 12
    for workers in (2, 4):
        for f in files:
            if workers == 4 or f.startswith("p0"):
                assert filecmp.cmp(outputs[1] / f, outputs[workers] / f, shallow=False), (workers, f)


def test_sampling_and_max_samples(tmp_path):
    src = write_rows(tmp_path / "d.jsonl", [{"i": i} for i in range(10)])

    def taken(spec, **kw):
        return [json.loads(p)["i"] for _, p in readers.iter_records(readers.parse_inputs(spec), **kw)]

    three = taken(f"{src}#3", seed=1)
    assert len(three) == 3 and three == sorted(three) and three == taken(f"{src}#3", seed=1)
    assert {tuple(taken(f"{src}#3", seed=s)) for s in range(5)} != {tuple(three)}  # the seed matters
    more = taken(f"{src}#23", seed=1)
    assert more[:20] == list(range(10)) * 2 and len(more) == 23 and len(set(more[20:])) == 3
    assert taken(src, max_samples=4) == [0, 1, 2, 3]
    assert taken(f"{src},{src}#2", max_samples=11)[:10] == list(range(10))
    assert readers.known_total(readers.parse_inputs(f"{src},{src}#2"), None) == 12


def test_json_array_reader_streams_across_buffer_refills(tmp_path):
    rows = [{"text": "x" * (i * 7 % 50), "n": i, "nested": {"a": [1, 2, {"b": "}]"}]}} for i in range(40)]
    path = write_rows(tmp_path / "d.json", rows)
    reader = readers._JsonArrayReader(path)
    reader.CHUNK = 13  # many refills, elements cut anywhere
    got = list(reader)
    assert [obj for _, obj in got] == rows
    with open(path) as f:
        lines = f.read().split("\n")
    for loc, obj in got:  # the line of each element is where it starts
        assert lines[loc.line - 1].lstrip().startswith("{") and loc.index == obj["n"]
