"""Token ids for many strings at once, in worker processes that never import transformers.

The main process loads the HF tokenizer (``load_hf_tokenizer``); a fast tokenizer travels to the workers as
its ``tokenizers`` JSON (``TokenizerSpec``) and encodes a whole chunk's strings in one ``encode_batch_fast``
call (no offsets computed); a slow tokenizer is loaded by path and encodes string by string.

Byte-level BPE tokenizers of the GPT-2 / Qwen2 / Llama 3 kind go through ``WordCache`` instead: their
encoding of a string is the concatenation of the BPE of each pre-tokenized word, so the ids of each word are
computed once, by the tokenizer's own BPE model, and looked up afterwards. ``tokenizers`` spends most of its
time per word (pre-tokenization and per-token objects), and words repeat, so this is ~3x cheaper; see
``WordCache`` for why the ids are the same.
"""
from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from itertools import chain

from mindspeed_lora.errors import UserError


@dataclass(frozen=True)
class TokenizerSpec:
    path: str
    use_fast: bool
    backend_json: str | None  # fast tokenizers: tokenizers' JSON


def load_hf_tokenizer(path: str | None, use_fast: bool = True):
    if not path:
        raise UserError("--tokenizer-name-or-path is required (an HF tokenizer directory)")
    if not os.path.isdir(path):
        raise UserError(f"--tokenizer-name-or-path {path}: not a directory; expected an HF tokenizer directory "
                        "(models are never downloaded here)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, use_fast=use_fast, trust_remote_code=False)
    except Exception as e:  # transformers raises many types for a directory without tokenizer files
        raise UserError(f"--tokenizer-name-or-path {path}: cannot load an HF tokenizer ({e})") from e


def tokenizer_spec(tokenizer, path: str, use_fast: bool) -> TokenizerSpec:
    backend = getattr(tokenizer, "backend_tokenizer", None) if use_fast else None
    if backend is None:
        return TokenizerSpec(path, False, None)
    return TokenizerSpec(path, True, backend.to_str())


# The pre-tokenizer patterns WordCache accepts (GPT-2's, Qwen2's, Llama 3's, as in their tokenizer.json) ...
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                 r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                  r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
# ... and the same patterns for Python's ``re``, which has no \p{..}: {L}, {N}, {S} become the letters, numbers
# and spaces among the safe characters below (the only ones these forms are used on)
_RE_FORMS = {
    GPT2_PATTERN: r"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+",
    QWEN2_PATTERN: (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n{L}{N}]?[{L}]+|[{N}]| ?[^{S}{L}{N}]+[\r\n]*|[{S}]*[\r\n]+|"
                    r"[{S}]+(?![^{S}])|[{S}]+"),
    LLAMA3_PATTERN: (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n{L}{N}]?[{L}]+|[{N}]{1,3}| ?[^{S}{L}{N}]+[\r\n]*|"
                     r"[{S}]*[\r\n]+|[{S}]+(?![^{S}])|[{S}]+"),
}
# Safe characters: their Unicode properties (letter, number, space) have not changed since Unicode 3.2, so
# Python and tokenizers' Oniguruma classify them alike, and NFC leaves them as they are: ASCII without the
# separators \x1c-\x1f, Latin-1 letters and signs, dashes, quotes and other punctuation of Unicode 1.1's
# General Punctuation (not its spaces and format characters), CJK symbols (without the combining tone marks),
# the CJK ideographs of Unicode 1.1 and fullwidth ASCII. Strings with anything else take tokenizers' own path.
_UNSAFE = re.compile("[^\x00-\x1b\x20-\x7e\xa0-\xff\u2010-\u2027\u2030-\u203e\u3000-\u3029\u3030-\u303f"
                     "\u4e00-\u9fa5\uff01-\uff5e]")


@functools.cache
def _safe_classes() -> dict[str, str]:
    """The letters, numbers and spaces among the safe characters, as ``re`` class bodies."""
    import unicodedata

    safe = [chr(c) for c in range(0x10000) if not _UNSAFE.match(chr(c))]
    kinds = {"{L}": lambda c: unicodedata.category(c).startswith("L"),
             "{N}": lambda c: unicodedata.category(c).startswith("N"), "{S}": str.isspace}
    out = {}
    for name, test in kinds.items():
        points = [ord(c) for c in safe if test(c)]
        runs, start = [], 0
        for i in range(1, len(points) + 1):  # consecutive code points as one range
            if i == len(points) or points[i] != points[i - 1] + 1:
                first, last = chr(points[start]), chr(points[i - 1])
                runs.append(re.escape(first) + ("-" + re.escape(last) if last != first else ""))
                start = i
        out[name] = "".join(runs)
    return out


def _re_form(pattern: str):
    form = _RE_FORMS[pattern]
    for name, body in _safe_classes().items():
        form = form.replace(name, body)
    return re.compile(form)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (tokenizers' ByteLevel)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    out, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


class WordCache:
    """Exact word-level encoding for byte-level BPE tokenizers (``WordCache.build`` returns None for others).

    Why the ids equal ``encode(text, add_special_tokens=False)``: tokenizers (1) splits the text at added
    tokens, (2) normalizes each remaining piece, (3) pre-tokenizes it with one regex into words and maps each
    word's UTF-8 bytes to characters (ByteLevel), (4) runs the BPE model on each word alone, (5) adds nothing
    else without special tokens. ``build`` accepts only tokenizers where each step is one this class
    re-does exactly: added tokens without lstrip / rstrip / single_word / normalized (matched leftmost-
    longest, as here); no normalizer or NFC, which leaves safe text unchanged; one of the known patterns, run by
    ``re`` only on strings of safe characters (``_UNSAFE``; other strings go to tokenizers);
    a BPE model without dropout, called through tokenizers itself for each new word; no truncation or
    padding. A test compares it with tokenizers on random strings for each pattern. The cache is bounded:
    emptied when full.
    """

    MAX_IDS = 1 << 16  # ids kept in the cache, words counted as one more each: ~6 MB at most
    MAX_CACHED_CHARS = 24  # longer words (a Chinese clause is one) rarely repeat: not kept

    def __init__(self, tokenizer, pattern: str, added: dict[str, int]):
        self._tok = tokenizer
        self._model = tokenizer.model
        self._words = _re_form(pattern)
        # longest first: the leftmost match is then the longest, as tokenizers' Aho-Corasick matcher finds
        self._added = re.compile("(" + "|".join(map(re.escape, sorted(added, key=len, reverse=True))) + ")"
                                 ) if added else None
        self._added_ids = added
        self._byte_chars = _bytes_to_unicode()
        self._cache = _BoundedCache(self)

    @classmethod
    def build(cls, tokenizer, backend_json: str) -> "WordCache | None":
        spec = json.loads(backend_json)
        model, pre, norm = spec.get("model") or {}, spec.get("pre_tokenizer") or {}, spec.get("normalizer")
        if spec.get("truncation") is not None or spec.get("padding") is not None:
            return None
        if model.get("type") != "BPE" or model.get("dropout") not in (None, 0, 0.0):
            return None
        if norm is not None and norm != {"type": "NFC"}:
            return None
        if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
            pattern = GPT2_PATTERN
        elif pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 2:
            split, byte_level = pre["pretokenizers"]
            ok = (split.get("type") == "Split" and split.get("behavior") == "Isolated" and not split.get("invert")
                  and byte_level.get("type") == "ByteLevel" and not byte_level.get("use_regex", True)
                  and not byte_level.get("add_prefix_space"))
            pattern = split.get("pattern", {}).get("Regex") if ok else None
            if pattern not in _RE_FORMS:
                return None
        else:
            return None
        added = {}
        for t in spec.get("added_tokens", []):
            if t.get("lstrip") or t.get("rstrip") or t.get("single_word") or t.get("normalized"):
                return None
            added[t["content"]] = t["id"]
        return cls(tokenizer, pattern, added)

    def encode(self, texts: list[str]) -> list[list[int]]:
        out: list = [None] * len(texts)
        rest = []
        for i, text in enumerate(texts):
            ids = None if _UNSAFE.search(text) else self._encode(text)
            if ids is None:
                rest.append(i)
            else:
                out[i] = ids
        if rest:
            for i, e in zip(rest, self._tok.encode_batch_fast([texts[i] for i in rest], add_special_tokens=False)):
                out[i] = e.ids
        return out

    def _encode(self, text: str) -> list[int] | None:
        parts = self._added.split(text) if self._added is not None else [text]
        ids: list[int] = []
        cache = self._cache
        for k, part in enumerate(parts):
            if k % 2:  # the split's captured added token
                ids.append(self._added_ids[part])
                continue
            if not part:
                continue
            words = self._words.findall(part)
            if sum(map(len, words)) != len(part):  # the regex skipped text (it cannot with the known patterns)
                return None
            ids.extend(chain.from_iterable(map(cache.__getitem__, words)))
        return ids

    def bpe(self, word: str) -> list[int]:
        """The ids of one pre-tokenized word, from the tokenizer's BPE model."""
        chars = "".join(map(self._byte_chars.__getitem__, word.encode("utf-8")))
        return [t.id for t in self._model.tokenize(chars)]


class _BoundedCache(dict):
    """word -> ids; a miss asks the BPE model. Emptied when full, so memory stays bounded."""

    def __init__(self, owner: WordCache):
        super().__init__()
        self._owner = owner
        self.size = 0  # ids + words held

    def __missing__(self, word: str) -> list[int]:
        owner = self._owner
        ids = owner.bpe(word)
        if len(word) <= owner.MAX_CACHED_CHARS:
            if self.size + len(ids) + 1 > owner.MAX_IDS:
                self.clear()
                self.size = 0
            self[word] = ids
            self.size += len(ids) + 1
        return ids


class TextEncoder:
    """``encode(texts)`` -> token ids of each text, without the tokenizer's own special tokens (as
    MindSpeed-LLM encodes template pieces); ``encode_documents`` adds them (pretraining text)."""

    def __init__(self, spec: TokenizerSpec):
        self.spec = spec
        if spec.use_fast:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_str(spec.backend_json)
            self._hf = None
            self._words = WordCache.build(self._tok, spec.backend_json)
        else:
            self._tok = None
            self._hf = load_hf_tokenizer(spec.path, use_fast=False)
            self._words = None

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self._hf is not None:
            return [self._hf.encode(t, add_special_tokens=False) for t in texts]
        if self._words is not None:
            return self._words.encode(texts)
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def encode_documents(self, texts: list[str]) -> list[list[int]]:
        if self._hf is not None:
            return [self._hf.encode(t) for t in texts]
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=True)]
