"""Token ids for many strings at once, in worker processes that never import transformers.

The main process loads the HF tokenizer (``load_hf_tokenizer``); a fast tokenizer travels to the workers as
its ``tokenizers`` JSON (``TokenizerSpec``), a slow one by path.

Speed: ``tokenizers`` pays a fixed cost per encoded string. Where it is provably the same result, texts are
joined with a special token between them, encoded in one call and split again at that token: an added
special token (not stripping, not normalized) cuts the text before normalization and pre-tokenization, so
when those work split by split (NFC-style normalizers; ByteLevel without prefix space, Split, Digits,
Punctuation, Whitespace pre-tokenizers) ``encode(a + SEP + b) == encode(a) + [SEP] + encode(b)``. Metaspace
(sentencepiece-style) tokenizers treat the first split differently and are encoded text by text. A text
that itself contains SEP is caught (wrong SEP count) and encoded alone.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from mindspeed_lora.errors import UserError

_SPLITWISE_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase"}
_SPLITWISE_PRETOKENIZERS = {"Split", "Digits", "Punctuation", "Whitespace", "WhitespaceSplit", "ByteLevel"}
JOIN_GROUP = 64  # texts per joined string: long enough to amortize the per-call cost, short for good splits


@dataclass(frozen=True)
class TokenizerSpec:
    path: str
    use_fast: bool
    backend_json: str | None  # fast tokenizers: tokenizers' JSON
    join_token: str | None  # the special token texts are joined with, when that is exact (see module doc)
    join_id: int | None


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
        return TokenizerSpec(path, False, None, None, None)
    backend_json = backend.to_str()
    token = _join_token(json.loads(backend_json))
    return TokenizerSpec(path, True, backend_json, token,
                         tokenizer.convert_tokens_to_ids(token) if token is not None else None)


def _splitwise(node, allowed: set[str], key: str) -> bool:
    if node is None:
        return True
    if node.get("type") == "Sequence":
        return all(_splitwise(n, allowed, key) for n in node.get(key, []))
    if node.get("type") == "ByteLevel" and node.get("add_prefix_space"):
        return False
    return node.get("type") in allowed


def _join_token(config: dict) -> str | None:
    if not (_splitwise(config.get("normalizer"), _SPLITWISE_NORMALIZERS, "normalizers")
            and _splitwise(config.get("pre_tokenizer"), _SPLITWISE_PRETOKENIZERS, "pretokenizers")):
        return None
    for t in sorted(config.get("added_tokens", []), key=lambda t: t["id"]):
        if t.get("special") and not (t.get("lstrip") or t.get("rstrip") or t.get("normalized")
                                     or t.get("single_word")):
            return t["content"]
    return None


class TextEncoder:
    """``encode(texts)`` -> token ids of each text, without the tokenizer's own special tokens (as
    MindSpeed-LLM encodes template pieces); ``encode_documents`` adds them (pretraining text)."""

    def __init__(self, spec: TokenizerSpec):
        self.spec = spec
        if spec.use_fast:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_str(spec.backend_json)
            self._hf = None
        else:
            self._tok = None
            self._hf = load_hf_tokenizer(spec.path, use_fast=False)

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self._hf is not None:
            return [self._hf.encode(t, add_special_tokens=False) for t in texts]
        if self.spec.join_id is None:
            return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]
        sep, sep_id = self.spec.join_token, self.spec.join_id
        groups = [texts[i:i + JOIN_GROUP] for i in range(0, len(texts), JOIN_GROUP)]
        encodings = self._tok.encode_batch_fast([sep.join(g) for g in groups], add_special_tokens=False)
        out = []
        for group, enc in zip(groups, encodings):
            ids = enc.ids
            parts, start = [], 0
            try:
                for _ in range(len(group) - 1):
                    end = ids.index(sep_id, start)
                    parts.append(ids[start:end])
                    start = end + 1
                if sep_id in ids[start:]:
                    raise ValueError
                parts.append(ids[start:])
            except ValueError:  # a text contains the separator itself: encode this group text by text
                parts = [e.ids for e in self._tok.encode_batch_fast(group, add_special_tokens=False)]
            out += parts
        return out

    def encode_documents(self, texts: list[str]) -> list[list[int]]:
        if self._hf is not None:
            return [self._hf.encode(t) for t in texts]
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=True)]
