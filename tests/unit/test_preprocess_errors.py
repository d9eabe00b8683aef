"""preprocess_data on bad input: each error names the file, the line or sample, and what was expected;
--skip-bad-samples turns sample errors into counted skips; over-long samples are dropped and counted."""
from __future__ import annotations

import json
import multiprocessing
import os

import pytest

from mindspeed_lora.data.preprocess import PreprocessConfig, run_preprocess
from mindspeed_lora.errors import UserError
from tests.unit.test_preprocess import decoded, read_key, write_rows

GOOD = {"instruction": "Hi", "input": "", "output": "Meow."}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from mindspeed_lora.tiny import build_tokenizer

    d = str(tmp_path_factory.mktemp("tok"))
    build_tokenizer(d)
    return d


def write_lines(path, lines: list[bytes]):
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return str(path)


def line(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


def run(tmp_path, src, tok_dir, handler="AlpacaStyleInstructionHandler", prompt_type="chatml", **kw):
    cfg = PreprocessConfig(input=src, output_prefix=str(tmp_path / "out" / "ds"), handler_name=handler,
                           tokenizer_name_or_path=tok_dir, prompt_type=prompt_type, progress=False, **kw)
    return run_preprocess(cfg)


def error_of(tmp_path, src, tok_dir, **kw) -> str:
    with pytest.raises(UserError) as e:
        run(tmp_path, src, tok_dir, **kw)
    out = tmp_path / "out"
    assert not os.path.exists(out) or all(not n.startswith(".") for n in os.listdir(out))  # staging removed
    return str(e.value)


@pytest.mark.parametrize("lines,where,fragments,kw", [
    ([line(GOOD), line(GOOD), b'{"instruction": "x", "output": ', line(GOOD)], "data.jsonl:3 (sample 3)",
     ["malformed JSON", "expected one JSON object per line"], {}),
    ([line({"question": "a", "output": "b"}), line(GOOD)], "data.jsonl:2 (sample 2)",
     ["no key 'question' (--map-keys prompt)", "the sample has ['input', 'instruction', 'output']"],
     {"map_keys": '{"prompt": "question"}'}),
    ([line({"instruction": "a", "output": 42})], "data.jsonl:1 (sample 1)",
     ["'output' is a number; expected a string"], {}),
    ([line(GOOD), b'{"instruction": "caf\xe9", "output": "x"}'], "data.jsonl:2 (sample 2)",
     ["not valid UTF-8", "expected UTF-8"], {}),
    ([line(GOOD), b"", line([1, 2])], "data.jsonl:3 (sample 2)", ["expected a JSON object"], {}),
    ([line({"instruction": "a", "output": "b", "history": "oops"})], "data.jsonl:1",
     ["'history' is a string; expected a list of [query, response] string pairs"], {}),
    ([line({"conversations": "hello"})], "data.jsonl:1", ["'conversations' is a string; expected a list"],
     {"handler": "SharegptStyleInstructionHandler"}),
    ([line({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]})], "data.jsonl:1",
     ["conversations[0] has from 'gpt'; expected a user or tool observation turn"],
     {"handler": "SharegptStyleInstructionHandler"}),
    ([line({"conversations": [{"from": "human", "value": "a"}]})], "data.jsonl:1",
     ["has 1 turns; expected user/assistant pairs ending with an assistant turn"],
     {"handler": "SharegptStyleInstructionHandler"}),
])
def test_bad_sample_is_named(tmp_path, tok_dir, lines, where, fragments, kw):
    src = write_lines(tmp_path / "data.jsonl", lines)
    message = error_of(tmp_path, src, tok_dir, **kw)
    assert message.startswith(f"{src[:-len('data.jsonl')]}{where}"), message
    for f in fragments:
        assert f in message, message


def test_empty_file(tmp_path, tok_dir):
    src = tmp_path / "data.jsonl"
    src.write_bytes(b"\n  \n")
    assert error_of(tmp_path, str(src), tok_dir) == f"{src}: empty file; expected at least one sample"


def test_unknown_handler_and_template(tmp_path, tok_dir):
    src = write_rows(tmp_path / "data.jsonl", [GOOD])
    m = error_of(tmp_path, src, tok_dir, handler="AlpacaHandler")
    assert "--handler-name 'AlpacaHandler': unknown handler; expected one of AlpacaStyleInstructionHandler" in m
    m = error_of(tmp_path, src, tok_dir, prompt_type="qwen9")
    assert "--prompt-type 'qwen9': no such template in" in m and "templates.json; known: " in m and "qwen3" in m
    m = error_of(tmp_path, src, tok_dir, prompt_type=None)
    assert m.startswith("--prompt-type is required for AlpacaStyleInstructionHandler")
    m = error_of(tmp_path, src, tok_dir, map_keys='{"promt": "q"}')
    assert "--map-keys: unknown key 'promt' for AlpacaStyleInstructionHandler; expected some of" in m
    m = error_of(tmp_path, str(tmp_path / "nope.jsonl"), tok_dir)
    assert m.endswith("nope.jsonl: no such file or directory")


def test_json_array_errors(tmp_path, tok_dir):
    src = tmp_path / "data.json"
    src.write_bytes(b'[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "b\xff", "output": "c"}\n]\n')
    m = error_of(tmp_path, str(src), tok_dir)
    assert m.startswith(f"{src}:3 (sample 2): text with bytes that are not valid UTF-8; expected UTF-8"), m
    src.write_bytes(b'[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "b" "output": "c"}\n]\n')
    m = error_of(tmp_path, str(src), tok_dir, skip_bad_samples=True)
    assert m.startswith(f"{src}:3: malformed JSON (Expecting ',' delimiter); expected a JSON array of objects"), m


def test_csv_row_with_wrong_field_count(tmp_path, tok_dir):
    src = tmp_path / "data.csv"
    src.write_text("instruction,input,output\nHi,,Meow.\n\"two\nlines\",,x,extra\n", encoding="utf-8")
    m = error_of(tmp_path, str(src), tok_dir)
    assert m.startswith(f"{src}:3 (sample 2): row has 4 fields; expected 3"), m


def test_skip_bad_samples_counts_them(tmp_path, tok_dir):
    d = tmp_path / "in"
    d.mkdir()
    write_lines(d / "a.jsonl", [line(GOOD), b"{oops", line({"prompt": 1}), line({"instruction": 1, "output": "x"}),
                                b'{"instruction": "\xff", "output": "x"}',
                                line({"instruction": "Bye", "output": "Purr."})])
    (d / "b.jsonl").write_bytes(b"")
    (d / "README.md").write_text("not data")
    summary = run(tmp_path, str(d), tok_dir, skip_bad_samples=True)
    assert summary["samples_read"] == 6 and summary["samples_written"] == 2
    assert summary["skipped_bad_samples"] == {"malformed JSON": 1, "missing key": 1, "wrong type": 1,
                                              "not UTF-8": 1, "empty file": 1}
    assert summary["examples"]["malformed JSON"][0].startswith(f"{d / 'a.jsonl'}:2 (sample 2): malformed JSON")
    assert summary["examples"]["empty file"] == [str(d / "b.jsonl")]
    assert summary["ignored_files"] == [str(d / "README.md")]
    assert [s["trained"] for s in decoded(tmp_path, tok_dir)] == [["Meow.<|im_end|>"], ["Purr.<|im_end|>"]]
    # all bad: an error, not an empty dataset
    write_lines(d / "a.jsonl", [b"{oops"])
    assert "no sample was written (1 read, 0 dropped, 2 skipped)" in error_of(tmp_path, str(d), tok_dir,
                                                                              skip_bad_samples=True)


def test_long_samples_are_dropped_and_counted(tmp_path, tok_dir):
    rows = [GOOD, {"instruction": "Tell a story", "output": "once upon a time " * 20}, GOOD]
    src = write_rows(tmp_path / "data.jsonl", rows)
    run(tmp_path, src, tok_dir)
    short, long, _ = (len(x) for x in read_key(str(tmp_path / "out" / "ds"), "input_ids"))
    assert short < long
    # length >= seq-length is dropped (MindSpeed-LLM's rule), never truncated
    summary = run(tmp_path, src, tok_dir, seq_length=long)
    assert summary["samples_written"] == 2
    assert summary["dropped"] == {f"length >= --seq-length {long}": 1}
    assert summary["examples"][f"length >= --seq-length {long}"] == [f"{src}:2 (sample 2)"]
    assert [len(x) for x in read_key(str(tmp_path / "out" / "ds"), "input_ids")] == [short, short]
    summary = run(tmp_path, src, tok_dir, seq_length=long + 1)
    assert summary["samples_written"] == 3 and summary["dropped"] == {}
    summary = run(tmp_path, src, tok_dir, seq_length=short + 1)
    assert summary["samples_written"] == 2 and summary["dropped"] == {f"length >= --seq-length {short + 1}": 1}


def test_bad_flags(tmp_path, tok_dir):
    src = write_rows(tmp_path / "data.jsonl", [GOOD])
    assert "need --seq-length" in error_of(tmp_path, src, tok_dir, pack=True)
    assert "only for instruction data" in error_of(tmp_path, src, tok_dir, handler="AlpacaStylePairwiseHandler",
                                                   pack=True, seq_length=64)
    assert "--workers 0: expected >= 1" in error_of(tmp_path, src, tok_dir, workers=0)
    m = error_of(tmp_path, src, str(tmp_path))
    assert m.startswith(f"--tokenizer-name-or-path {tmp_path}: cannot load an HF tokenizer")


def test_bad_templates_file(tmp_path, tok_dir):
    src = write_rows(tmp_path / "data.jsonl", [GOOD])
    path = tmp_path / "templates.json"
    path.write_text('[{"name": "x", "format_user": {"slots": ["{{content}}"]}, "format_prefix": '
                    '{"slots": [{"token": "<s>"}]}}, {"name": "y", "format_usr": {"slots": []}}]')
    m = error_of(tmp_path, src, tok_dir, prompt_type="x", prompt_type_path=str(path))
    assert m.startswith("template 'x': token '<s>' is not in the tokenizer's vocabulary")
    m = error_of(tmp_path, src, tok_dir, prompt_type="y", prompt_type_path=str(path))
    assert m.startswith(f"{path}: template 'y': unknown keys ['format_usr']")
    path.write_text("[{")
    m = error_of(tmp_path, src, tok_dir, prompt_type="x", prompt_type_path=str(path))
    assert m.startswith(f"--prompt-type-path {path}: not valid JSON")


def test_leftover_staging_directory_is_reported(tmp_path, tok_dir, capsys):
    src = write_rows(tmp_path / "data.jsonl", [GOOD])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".ds.tmp-99999-deadbeef").mkdir()  # what kill -9 leaves behind
    run(tmp_path, src, tok_dir)
    err = capsys.readouterr().err
    assert f"{tmp_path / 'out' / '.ds.tmp-99999-deadbeef'} is left over from an interrupted run" in err
    assert os.path.exists(tmp_path / "out" / "ds_packed_labels_document.idx")


class WorkerKillingHandler:
    """Wraps a handler; in a worker process, the sample 'die' ends the process as the OOM killer would."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        if name == "inner":  # while unpickling, before __dict__ is set
            raise AttributeError(name)
        return getattr(self.inner, name)

    def convert(self, sample):
        if sample.get("instruction") == "die" and multiprocessing.parent_process() is not None:
            os._exit(9)
        return self.inner.convert(sample)


def test_a_worker_that_dies_is_reported_not_waited_for(tmp_path, tok_dir):
    import dataclasses

    from mindspeed_lora.data import readers
    from mindspeed_lora.data.preprocess import build_encoder_state, encoded_chunks

    src = write_lines(tmp_path / "data.jsonl", [line(GOOD)] * 700 + [line({**GOOD, "instruction": "die"})])
    cfg = PreprocessConfig(input=src, output_prefix=str(tmp_path / "out" / "ds"),
                           handler_name="AlpacaStyleInstructionHandler", tokenizer_name_or_path=tok_dir,
                           prompt_type="chatml", progress=False)
    state = build_encoder_state(cfg)
    state = dataclasses.replace(state, handler=WorkerKillingHandler(state.handler))
    records = readers.iter_records(readers.parse_inputs(src), 1234, None, lambda path: None)
    with pytest.raises(UserError, match=r"a --workers process died while the samples from .*data.jsonl:(1|513) "
                                        r"\(sample (1|513)\) on were being encoded.*rerun with fewer --workers"):
        for _ in encoded_chunks(state, records, workers=2):
            pass
