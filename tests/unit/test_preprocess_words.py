"""The word-level fast path of preprocessing's tokenization (``encoder.WordCache``) against ``tokenizers``
itself (the oracle): the same ids for random strings, for each pre-tokenizer it accepts; tokenizers it
cannot match exactly are refused."""
from __future__ import annotations

import json
import random

import pytest

from mindspeed_lora.data.encoder import LLAMA3_PATTERN, QWEN2_PATTERN, WordCache

# what the random strings are made of: words, digits, spaces of every kind, English contractions in both
# cases, Latin-1, Chinese, typographic, CJK and fullwidth punctuation, added tokens whole and broken; then characters
# outside the fast path's safe set (emoji, combining marks, \x1c, NEL, Cyrillic, line separator, ligatures,
# zero-width and thin spaces)
COMMON_PIECES = list("abcXYZ09 '\n\r\t.,!?-_\"") + [
    "'s", "'S", "'re", "'LL", "'d", "  ", "\n\n", " \n", "\r\n", "123456", "\u00e9", "\u00fc", "\xa0", "\u00df",
    "\u00b2", "\u00bd", "\u4e2d", "\u56fd", "\u4f60\u597d", "\uff0c", "\u3002", "\u3000", "\u3007", "\u3021",
    "\uff10", "\uff21", "\uff01", "<|im_end|>", "<|im_start|>", "<think>", "</think>", "<|im_end", "<", "|>", "\x0b",
    "\x0c", "\x00"]
SAFE_PIECES = (COMMON_PIECES + [chr(c) for c in range(0xa0, 0x100)] + [chr(c) for c in range(0xff01, 0xff5f)]
               + [chr(c) for c in range(0x2010, 0x2028)] + [chr(c) for c in range(0x2030, 0x203f)]
               + [chr(c) for c in range(0x3000, 0x3040) if not 0x302a <= c <= 0x302f]
               + [chr(c) for c in range(0x4e00, 0x9fa6, 97)])
OTHER_PIECES = ["\U0001f600", "e\u0301", "\x1c", "\x85", "\u0416", "\u2028", "\ufb01", "\u302a", "\U0001d7d8",
                "\u3099", "\x7f", "\u200b", "\u2009", "\u203f"]


@pytest.fixture(scope="module")
def tok_json(tmp_path_factory):
    from mindspeed_lora.tiny import build_tokenizer

    d = tmp_path_factory.mktemp("tok")
    build_tokenizer(str(d))
    with open(d / "tokenizer.json", encoding="utf-8") as f:
        return json.load(f)


def variant(base: dict, pattern: str | None = None, normalizer: dict | None = None, **changes) -> str:
    """The tiny tokenizer with a Split + ByteLevel pre-tokenizer (Qwen2 / Llama 3 style) and other changes."""
    spec = json.loads(json.dumps(base))
    if pattern is not None:
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
    spec["normalizer"] = normalizer
    spec.update(changes)
    return json.dumps(spec)


def random_texts(seed: int, n: int, pieces) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(COMMON_PIECES if rng.random() < 0.7 else pieces) for _ in range(rng.randint(0, 40)))
            for _ in range(n)]


@pytest.mark.parametrize("pattern,normalizer", [(None, None), (QWEN2_PATTERN, {"type": "NFC"}),
                                                (LLAMA3_PATTERN, None)], ids=["gpt2", "qwen2-nfc", "llama3"])
def test_word_cache_equals_tokenizers(tok_json, pattern, normalizer):
    from tokenizers import Tokenizer

    spec = variant(tok_json, pattern, normalizer)
    tok = Tokenizer.from_str(spec)
    words = WordCache.build(tok, spec)
    assert words is not None
    texts = random_texts(0, 3000, SAFE_PIECES) + random_texts(1, 1000, SAFE_PIECES + OTHER_PIECES)
    want = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    assert words.encode(texts) == want
    assert words.encode(texts[::-1]) == want[::-1]  # again, now from the cache
    assert len(words._cache) > 100  # the fast path did the work


def test_preprocessing_uses_it_for_the_test_tokenizer(tmp_path):
    """So the decode tests of preprocess_data exercise the fast path."""
    from mindspeed_lora.data.encoder import TextEncoder, load_hf_tokenizer, tokenizer_spec
    from mindspeed_lora.tiny import build_tokenizer

    build_tokenizer(str(tmp_path))
    spec = tokenizer_spec(load_hf_tokenizer(str(tmp_path)), str(tmp_path), True)
    assert isinstance(TextEncoder(spec)._words, WordCache)


def test_word_cache_is_bounded(tok_json):
    from tokenizers import Tokenizer

    spec = json.dumps(tok_json)
    tok = Tokenizer.from_str(spec)
    words = WordCache.build(tok, spec)
    words.MAX_IDS, words.MAX_CACHED_CHARS = 40, 3
    texts = random_texts(2, 500, SAFE_PIECES)
    assert words.encode(texts) == [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    cache = words._cache
    assert 0 < cache.size == len(cache) + sum(map(len, cache.values())) <= 40
    assert max(map(len, cache)) <= 3


def test_word_cache_refuses_tokenizers_it_cannot_match(tok_json):
    from tokenizers import Tokenizer

    def lstrip_token(spec):
        spec["added_tokens"][1]["lstrip"] = True
        return spec

    model = dict(tok_json["model"], dropout=0.1)
    refused = [
        variant(tok_json, normalizer={"type": "NFKC"}),
        variant(tok_json, model=model),
        variant(tok_json, QWEN2_PATTERN.replace("\\p{L}+", "[\\p{L}\\p{M}]+")),  # a pattern not checked here
        variant(tok_json, pre_tokenizer={"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                            "use_regex": True}),
        variant(tok_json, truncation={"direction": "Right", "max_length": 8, "strategy": "LongestFirst",
                                      "stride": 0}),
        json.dumps(lstrip_token(json.loads(json.dumps(tok_json)))),
    ]
    for spec in refused:
        assert WordCache.build(Tokenizer.from_str(spec), spec) is None, spec[:200]
