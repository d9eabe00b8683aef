"""Token ids for many strings at once, in worker processes that never import transformers.

The main process loads the HF tokenizer (``load_hf_tokenizer``); a fast tokenizer travels to the workers as
its ``tokenizers`` JSON (``TokenizerSpec``) and encodes a whole chunk's strings in one ``encode_batch_fast``
call (no offsets computed); a slow tokenizer is loaded by path and encodes string by string.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

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
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def encode_documents(self, texts: list[str]) -> list[list[int]]:
        if self._hf is not None:
            return [self._hf.encode(t) for t in texts]
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=True)]
