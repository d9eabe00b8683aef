"""preprocess_data: every template and handler, decoded back from the written .bin/.idx files.

The expected texts and trained spans below are written by hand from each model's chat format (not produced
by the code under test). ``trained`` lists the decoded runs of tokens whose label is not -100.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mindspeed_lora.data.preprocess import PreprocessConfig, run_preprocess

SYSTEM = "You are a cat."
TURNS = [("Hi", "Meow."), ("你好吗？", "我很好，喵。")]


# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from mindspeed_lora.tiny import build_tokenizer

    d = str(tmp_path_factory.mktemp("tok"))
    build_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def bos_tok_dir(tmp_path_factory, tok_dir):
    """The tiny tokenizer with a bos token (llama2 / mistral put it in their prompts)."""
    from transformers import AutoTokenizer

    d = str(tmp_path_factory.mktemp("tok_bos"))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.bos_token = "<|begin_of_text|>"
    tok.save_pretrained(d)
    return d


def write_rows(path, rows, fmt=None):
    fmt = fmt or os.path.splitext(str(path))[1][1:]
    if fmt == "jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    elif fmt == "json":
        with open(path, "w", encoding="utf-8") as f:
            json.dump(rows, f, ensure_ascii=False, indent=1)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "csv":
        import csv

        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return str(path)


def preprocess(tmp_path, rows, handler, tok_dir, prompt_type=None, name="data.jsonl", **kw):
    src = rows if isinstance(rows, str) else write_rows(tmp_path / name, rows)
    cfg = PreprocessConfig(input=src, output_prefix=str(tmp_path / "out" / "ds"), handler_name=handler,
                           tokenizer_name_or_path=tok_dir, prompt_type=prompt_type, progress=False, **kw)
    return run_preprocess(cfg)


def read_key(prefix, key, kind="sft"):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    name = f"{prefix}_{key}_document" if kind == "pretrain" else f"{prefix}_packed_{key}_document"
    ds = IndexedDataset(name)
    assert ds.index.dtype == np.int32
    return [np.array(ds[i]) for i in range(len(ds))]  # copies: the arrays outlive the mmap


def spans(labels):
    """Runs of positions whose label is not -100, as (start, end)."""
    out, start = [], None
    for i, v in enumerate(list(labels) + [-100]):
        if v != -100 and start is None:
            start = i
        elif v == -100 and start is not None:
            out.append((start, i))
            start = None
    return out


def decoded(tmp_path, tok_dir, key_prefix=""):
    """[{text, trained, mask}] of an SFT output (or one side of a pairwise output)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    prefix = str(tmp_path / "out" / "ds")
    ids = read_key(prefix, key_prefix + "input_ids")
    labels = read_key(prefix, key_prefix + "labels")
    masks = read_key(prefix, "attention_mask") if not key_prefix else [None] * len(ids)
    out = []
    for x, y, m in zip(ids, labels, masks):
        assert len(x) == len(y)
        trained = spans(y)
        for a, b in trained:  # labels are the input ids, unshifted
            assert (y[a:b] == x[a:b]).all()
        out.append({"text": tok.decode(x.tolist()), "trained": [tok.decode(y[a:b].tolist()) for a, b in trained],
                    "mask": None if m is None else m.tolist()})
    return out


def sharegpt(turns=TURNS, system=SYSTEM):
    conv = ([{"from": "system", "value": system}] if system else [])
    for q, a in turns:
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return {"conversations": conv}


# ---------------------------------------------------------------------------------------------- templates

MULTI_TURN = {
    "qwen3": (
        "<|im_start|>system\nYou are a cat.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "Meow.<|im_end|>\n<|im_start|>user\n你好吗？<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        "我很好，喵。<|im_end|>\n",
        ["Meow.<|im_end|>\n", "我很好，喵。<|im_end|>\n"]),
    "qwen": (
        "<|im_start|>system\nYou are a cat.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "Meow.<|im_end|>\n<|im_start|>user\n你好吗？<|im_end|>\n<|im_start|>assistant\n我很好，喵。<|im_end|>",
        ["Meow.<|im_end|>", "我很好，喵。<|im_end|>"]),
    "chatml": (
        "<|im_start|>system\nYou are a cat.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "Meow.<|im_end|>\n<|im_start|>user\n你好吗？<|im_end|>\n<|im_start|>assistant\n我很好，喵。<|im_end|>",
        ["Meow.<|im_end|>", "我很好，喵。<|im_end|>"]),
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a cat.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        "Meow.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n你好吗？<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n我很好，喵。<|eot_id|>",
        ["Meow.<|eot_id|>", "我很好，喵。<|eot_id|>"]),
    # the tiny tokenizer has no bos token: nothing is written for ["bos_token"]; its eos is <|im_end|>
    "llama2": (
        "[INST] <<SYS>>\nYou are a cat.\n<</SYS>>\n\nHi [/INST]Meow.<|im_end|>[INST] 你好吗？ [/INST]"
        "我很好，喵。<|im_end|>",
        ["Meow.<|im_end|>", "我很好，喵。<|im_end|>"]),
    "mistral": (
        "[INST] You are a cat.\n\nHi [/INST]Meow.<|im_end|>[INST] 你好吗？ [/INST]我很好，喵。<|im_end|>",
        ["Meow.<|im_end|>", "我很好，喵。<|im_end|>"]),
    "alpaca": (
        "You are a cat.### Instruction:\nHi\n\n### Response:\nMeow.<|im_end|>\n\n### Instruction:\n你好吗？\n\n"
        "### Response:\n我很好，喵。<|im_end|>",
        ["Meow.<|im_end|>", "我很好，喵。<|im_end|>"]),
    "default": (
        "You are a cat.\nHuman: Hi\nAssistant:Meow.<|im_end|>\nHuman: 你好吗？\nAssistant:我很好，喵。<|im_end|>",
        ["Meow.<|im_end|>", "我很好，喵。<|im_end|>"]),
    "empty": ("You are a cat.HiMeow.你好吗？我很好，喵。", ["Meow.", "我很好，喵。"]),
}


@pytest.mark.parametrize("template", sorted(MULTI_TURN))
def test_template_multi_turn_with_system(tmp_path, tok_dir, template):
    summary = preprocess(tmp_path, [sharegpt()], "SharegptStyleInstructionHandler", tok_dir, template)
    (sample,) = decoded(tmp_path, tok_dir)
    text, trained = MULTI_TURN[template]
    assert sample["text"] == text
    assert sample["trained"] == trained
    assert set(sample["mask"]) == {1}
    assert summary["samples_written"] == 1 and summary["dropped"] == {}


NO_SYSTEM = {
    "qwen": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nMeow.<|im_end|>",
    "chatml": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nMeow.<|im_end|>",
    "qwen3": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nMeow.<|im_end|>\n",
    "alpaca": "Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request.\n\n### Instruction:\nHi\n\n### Response:\nMeow.<|im_end|>",
    "llama2": "[INST] Hi [/INST]Meow.<|im_end|>",
}


@pytest.mark.parametrize("template", sorted(NO_SYSTEM))
def test_template_default_system(tmp_path, tok_dir, template):
    preprocess(tmp_path, [sharegpt(TURNS[:1], system=None)], "SharegptStyleInstructionHandler", tok_dir, template)
    (sample,) = decoded(tmp_path, tok_dir)
    assert sample["text"] == NO_SYSTEM[template]


@pytest.mark.parametrize("template,text", [
    ("llama2", "<|begin_of_text|>[INST] <<SYS>>\nYou are a cat.\n<</SYS>>\n\nHi [/INST]Meow.<|im_end|>"
               "<|begin_of_text|>[INST] 你好吗？ [/INST]我很好，喵。<|im_end|>"),
    ("mistral", "<|begin_of_text|>[INST] You are a cat.\n\nHi [/INST]Meow.<|im_end|>[INST] 你好吗？ [/INST]"
                "我很好，喵。<|im_end|>"),
])
def test_template_bos_token(tmp_path, bos_tok_dir, template, text):
    preprocess(tmp_path, [sharegpt()], "SharegptStyleInstructionHandler", bos_tok_dir, template)
    (sample,) = decoded(tmp_path, bos_tok_dir)
    assert sample["text"] == text
    assert sample["trained"] == ["Meow.<|im_end|>", "我很好，喵。<|im_end|>"]


# ---------------------------------------------------------------------------------------------- qwen3 thinking

Q3 = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
Q3_2 = "<|im_start|>user\n你好吗？<|im_end|>\n<|im_start|>assistant\n"
EMPTY = "<think>\n\n</think>\n\n"
THOUGHT1 = "<think>\nA greeting.\n</think>\n\n"
THOUGHT2 = "<think>\n用中文回答。\n</think>\n\n"


@pytest.mark.parametrize("enable,with_thoughts,text,trained", [
    # no thoughts in the data: the empty block goes to the prompt (false / none) or the answer (true)
    (None, False, Q3 + "Meow.<|im_end|>\n" + Q3_2 + EMPTY + "我很好，喵。<|im_end|>\n",
     ["Meow.<|im_end|>\n", "我很好，喵。<|im_end|>\n"]),
    (False, False, Q3 + "Meow.<|im_end|>\n" + Q3_2 + EMPTY + "我很好，喵。<|im_end|>\n",
     ["Meow.<|im_end|>\n", "我很好，喵。<|im_end|>\n"]),
    (True, False, Q3 + "Meow.<|im_end|>\n" + Q3_2 + EMPTY + "我很好，喵。<|im_end|>\n",
     ["Meow.<|im_end|>\n", EMPTY + "我很好，喵。<|im_end|>\n"]),
    # thoughts in the data: the history turn always loses its thought; the last keeps it unless false
    (None, True, Q3 + "Meow.<|im_end|>\n" + Q3_2 + THOUGHT2 + "我很好，喵。<|im_end|>\n",
     ["Meow.<|im_end|>\n", THOUGHT2 + "我很好，喵。<|im_end|>\n"]),
    (True, True, Q3 + "Meow.<|im_end|>\n" + Q3_2 + THOUGHT2 + "我很好，喵。<|im_end|>\n",
     ["Meow.<|im_end|>\n", THOUGHT2 + "我很好，喵。<|im_end|>\n"]),
    (False, True, Q3 + "Meow.<|im_end|>\n" + Q3_2 + EMPTY + "我很好，喵。<|im_end|>\n",
     ["Meow.<|im_end|>\n", "我很好，喵。<|im_end|>\n"]),
])
def test_qwen3_thinking(tmp_path, tok_dir, enable, with_thoughts, text, trained):
    turns = [("Hi", THOUGHT1 + "Meow."), ("你好吗？", THOUGHT2 + "我很好，喵。")] if with_thoughts else TURNS
    preprocess(tmp_path, [sharegpt(turns, system=None)], "SharegptStyleInstructionHandler", tok_dir, "qwen3",
               enable_thinking=enable)
    (sample,) = decoded(tmp_path, tok_dir)
    assert sample["text"] == text
    assert sample["trained"] == trained


def test_openai_reasoning_content_is_the_thought(tmp_path, tok_dir):
    row = {"messages": [{"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Meow.", "reasoning_content": "A greeting."}]}
    preprocess(tmp_path, [row], "OpenAIInstructionHandler", tok_dir, "qwen3", enable_thinking=True)
    (sample,) = decoded(tmp_path, tok_dir)
    assert sample["text"] == Q3 + THOUGHT1 + "Meow.<|im_end|>\n"
    assert sample["trained"] == [THOUGHT1 + "Meow.<|im_end|>\n"]


# ---------------------------------------------------------------------------------------------- handlers


def test_alpaca_history_system_and_input(tmp_path, tok_dir):
    rows = [{"instruction": "Translate", "input": "猫", "output": "cat", "system": SYSTEM,
             "history": [["Hi", "Meow."]]},
            {"instruction": "Count to 3", "output": "1 2 3"}]  # no input, system or history
    preprocess(tmp_path, rows, "AlpacaStyleInstructionHandler", tok_dir, "chatml")
    a, b = decoded(tmp_path, tok_dir)
    assert a["text"] == ("<|im_start|>system\nYou are a cat.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                         "<|im_start|>assistant\nMeow.<|im_end|>\n<|im_start|>user\nTranslate\n猫<|im_end|>\n"
                         "<|im_start|>assistant\ncat<|im_end|>")
    assert a["trained"] == ["Meow.<|im_end|>", "cat<|im_end|>"]
    assert b["text"] == "<|im_start|>user\nCount to 3<|im_end|>\n<|im_start|>assistant\n1 2 3<|im_end|>"
    assert b["trained"] == ["1 2 3<|im_end|>"]


def test_alpaca_map_keys_and_placeholders(tmp_path, tok_dir):
    rows = [{"question": "Who are you?", "answer": "I am <NAME>, made by <AUTHOR>.", "context": "ignored"}]
    preprocess(tmp_path, rows, "AlpacaStyleInstructionHandler", tok_dir, "empty",
               map_keys='{"prompt": "question", "query": null, "response": "answer"}',
               model_name="Tiny", model_author="Us")
    (sample,) = decoded(tmp_path, tok_dir)
    assert sample["text"] == "Who are you?I am Tiny, made by Us."
    assert sample["trained"] == ["I am Tiny, made by Us."]


def test_sharegpt_tags_function_call_and_observation(tmp_path, tok_dir):
    row = {"dialog": [{"role": "user", "text": "Weather?"},
                      {"role": "call", "text": "get_weather()"},
                      {"role": "tool", "text": "sunny"},
                      {"role": "bot", "text": "It is sunny."}]}
    keys = {"messages": "dialog", "tags": {"role_tag": "role", "content_tag": "text", "user_tag": "user",
                                           "assistant_tag": "bot", "function_tag": "call", "observation_tag": "tool"}}
    preprocess(tmp_path, [row], "SharegptStyleInstructionHandler", tok_dir, "qwen3", map_keys=json.dumps(keys))
    (sample,) = decoded(tmp_path, tok_dir)
    assert sample["text"] == (
        "<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\nget_weather()<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
        "<think>\n\n</think>\n\nIt is sunny.<|im_end|>\n")
    assert sample["trained"] == ["get_weather()<|im_end|>\n", "It is sunny.<|im_end|>\n"]


def test_openai_messages(tmp_path, tok_dir):
    row = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Meow."}, {"role": "user", "content": "你好吗？"},
                        {"role": "assistant", "content": "我很好，喵。"}]}
    preprocess(tmp_path, [row], "OpenAIInstructionHandler", tok_dir, "llama3")
    (sample,) = decoded(tmp_path, tok_dir)
    assert (sample["text"], sample["trained"]) == MULTI_TURN["llama3"]


def test_alpaca_pairwise(tmp_path, tok_dir):
    rows = [{"instruction": "Hi", "chosen": "Meow.", "rejected": "Woof.", "history": [["你好", "喵"]]},
            {"instruction": "Hi", "output": ["Purr.", "Bark."]}]
    summary = preprocess(tmp_path, rows[:1], "AlpacaStylePairwiseHandler", tok_dir, "chatml")
    assert summary["samples_written"] == 1
    chosen, = decoded(tmp_path, tok_dir, "chosen_")
    rejected, = decoded(tmp_path, tok_dir, "rejected_")
    history = "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n喵<|im_end|>\n"
    assert chosen["text"] == history + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nMeow.<|im_end|>"
    assert chosen["trained"] == ["Meow.<|im_end|>"]  # only the final answer: the history is prompt
    assert rejected["text"] == history + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nWoof.<|im_end|>"
    assert rejected["trained"] == ["Woof.<|im_end|>"]
    # the [chosen, rejected] list form, one column mapped to both keys
    preprocess(tmp_path, rows[1:], "AlpacaStylePairwiseHandler", tok_dir, "chatml",
               map_keys='{"chosen": "output", "rejected": "output"}')
    assert decoded(tmp_path, tok_dir, "chosen_")[0]["trained"] == ["Purr.<|im_end|>"]
    assert decoded(tmp_path, tok_dir, "rejected_")[0]["trained"] == ["Bark.<|im_end|>"]


def test_sharegpt_pairwise_qwen3(tmp_path, tok_dir):
    row = {"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": "Hi"}],
           "chosen": {"from": "gpt", "value": THOUGHT1 + "Meow."}, "rejected": {"from": "gpt", "value": "Woof."}}
    preprocess(tmp_path, [row], "SharegptStylePairwiseHandler", tok_dir, "qwen3")
    prompt = "<|im_start|>system\nYou are a cat.<|im_end|>\n" + Q3
    chosen, = decoded(tmp_path, tok_dir, "chosen_")
    rejected, = decoded(tmp_path, tok_dir, "rejected_")
    assert chosen["text"] == prompt + THOUGHT1 + "Meow.<|im_end|>\n"
    assert chosen["trained"] == [THOUGHT1 + "Meow.<|im_end|>\n"]
    assert rejected["text"] == prompt + EMPTY + "Woof.<|im_end|>\n"
    assert rejected["trained"] == ["Woof.<|im_end|>\n"]


def test_general_pretrain(tmp_path, tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    rows = [{"text": "The quick brown fox."}, {"text": "中国的首都是北京。"}, {"text": ""}]
    summary = preprocess(tmp_path, rows, "GeneralPretrainHandler", tok_dir, append_eod=True,
                         pad_to_multiple_of=8)
    docs = read_key(str(tmp_path / "out" / "ds"), "text", kind="pretrain")
    assert len(docs) == 2 and summary["dropped"] == {"empty text": 1}
    texts = ["The quick brown fox.<|im_end|>", "中国的首都是北京。<|im_end|>"]
    for doc, text in zip(docs, texts):
        assert len(doc) % 8 == 0
        body = doc[doc != tok.pad_token_id]
        assert tok.decode(body.tolist()) == text
        assert (doc[len(body):] == tok.pad_token_id).all()  # padding only at the end


def test_outputs_and_summary(tmp_path, tok_dir):
    summary = preprocess(tmp_path, [sharegpt()] * 3, "SharegptStyleInstructionHandler", tok_dir, "chatml")
    names = sorted(os.listdir(tmp_path / "out"))
    assert names == sorted([f"ds_packed_{k}_document.{e}" for k in ("input_ids", "attention_mask", "labels")
                            for e in ("bin", "idx")] + ["ds_summary.json"])
    with open(tmp_path / "out" / "ds_summary.json") as f:
        on_disk = json.load(f)
    assert on_disk["samples_read"] == 3 and on_disk["samples_written"] == 3
    assert on_disk["args"]["prompt_type"] == "chatml"
    ids = read_key(str(tmp_path / "out" / "ds"), "input_ids")
    assert summary["tokens"] == sum(len(x) for x in ids)


@pytest.mark.parametrize("fmt", ["json", "parquet", "csv"])
def test_other_file_formats(tmp_path, tok_dir, fmt):
    rows = [{"instruction": "Hi", "input": "", "output": "Meow."}, {"instruction": "你好", "input": "", "output": "喵"}]
    preprocess(tmp_path, rows, "AlpacaStyleInstructionHandler", tok_dir, "chatml", name=f"data.{fmt}")
    got = [s["trained"] for s in decoded(tmp_path, tok_dir)]
    assert got == [["Meow.<|im_end|>"], ["喵<|im_end|>"]]


def test_slow_tokenizer_path_gives_the_same_ids(tmp_path, tok_dir):
    """--tokenizer-not-use-fast: workers encode with the HF tokenizer object instead of its tokenizers JSON."""
    rows = [sharegpt()]
    preprocess(tmp_path, rows, "SharegptStyleInstructionHandler", tok_dir, "qwen3")
    fast = read_key(str(tmp_path / "out" / "ds"), "input_ids")
    preprocess(tmp_path, rows, "SharegptStyleInstructionHandler", tok_dir, "qwen3", tokenizer_not_use_fast=True)
    slow = read_key(str(tmp_path / "out" / "ds"), "input_ids")
    assert [x.tolist() for x in fast] == [x.tolist() for x in slow]


def test_efficient_eos(tmp_path, tok_dir):
    """efficient_eos: no eos after answers; the first token of each later prompt is labelled eos instead, and
    one eos ends the sample (trained)."""
    from transformers import AutoTokenizer

    path = tmp_path / "t.json"
    path.write_text(json.dumps([{"name": "ee", "format_user": {"slots": ["U:{{content}}\n"]},
                                 "format_separator": {"slots": ["\n"]}, "efficient_eos": True}]))
    preprocess(tmp_path, [sharegpt(system=None)], "SharegptStyleInstructionHandler", tok_dir, "ee",
               prompt_type_path=str(path))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    x = read_key(str(tmp_path / "out" / "ds"), "input_ids")[0]
    y = read_key(str(tmp_path / "out" / "ds"), "labels")[0]
    assert tok.decode(x.tolist()) == "U:Hi\nMeow.\nU:你好吗？\n我很好，喵。<|im_end|>"
    n_u1 = len(tok.encode("U:Hi\n", add_special_tokens=False))
    n_a1 = len(tok.encode("Meow.", add_special_tokens=False))
    start2 = n_u1 + n_a1  # the separator "\n" starts the second prompt
    assert (y[:n_u1] == -100).all() and (y[n_u1:start2] == x[n_u1:start2]).all()
    assert y[start2] == tok.eos_token_id != x[start2]
    n_p2 = len(tok.encode("\n", add_special_tokens=False)) + len(tok.encode("U:你好吗？\n", add_special_tokens=False))
    assert (y[start2 + 1:start2 + n_p2] == -100).all()
    assert (y[start2 + n_p2:] == x[start2 + n_p2:]).all() and x[-1] == tok.eos_token_id


def test_every_flag_reaches_the_config():
    from mindspeed_lora.arguments import parse_args

    argv = ["--input", "a.jsonl#5", "--output-prefix", "o/p", "--handler-name", "SharegptStylePairwiseHandler",
            "--map-keys", '{"messages": "m"}', "--json-keys", "t1", "t2", "--max-samples", "7", "--seed", "3",
            "--model-name", "N", "--model-author", "A", "--skip-bad-samples", "--tokenizer-type", "PretrainedFromHF",
            "--tokenizer-name-or-path", "tok", "--tokenizer-not-use-fast", "--prompt-type", "qwen3",
            "--prompt-type-path", "t.json", "--enable-thinking", "false", "--seq-length", "128",
            "--pad-to-multiple-of", "4", "--append-eod", "--workers", "3", "--log-interval", "9", "--no-progress",
            "--overwrite-cache", "--cache-dir", "c"]
    cfg = PreprocessConfig.from_args(parse_args("preprocess_data", argv))
    assert (cfg.input, cfg.output_prefix, cfg.handler_name, cfg.map_keys, cfg.json_keys) == (
        "a.jsonl#5", "o/p", "SharegptStylePairwiseHandler", '{"messages": "m"}', ("t1", "t2"))
    assert (cfg.max_samples, cfg.seed, cfg.model_name, cfg.model_author, cfg.skip_bad_samples) == (7, 3, "N", "A", True)
    assert (cfg.tokenizer_name_or_path, cfg.tokenizer_not_use_fast, cfg.prompt_type, cfg.prompt_type_path) == (
        "tok", True, "qwen3", "t.json")
    assert (cfg.enable_thinking, cfg.seq_length, cfg.pad_to_multiple_of, cfg.append_eod) == (False, 128, 4, True)
    assert (cfg.workers, cfg.log_interval, cfg.progress, cfg.pack) == (3, 9, False, False)
    packed = PreprocessConfig.from_args(parse_args("preprocess_data", argv[:4] + [
        "--handler-name", "AlpacaStyleInstructionHandler", "--prompt-type", "qwen3", "--seq-length", "64",
        "--neat-pack"]))
    assert packed.pack and packed.neat_pack
    with pytest.raises(SystemExit):  # a typo is an error, not a silently ignored flag
        parse_args("preprocess_data", argv + ["--pakc"])
