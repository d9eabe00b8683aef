"""Printing generated text while it is generated, whole characters only."""
from __future__ import annotations

import sys
from typing import TextIO


class TextStreamer:
    """Decodes the growing token list and writes what is new; holds back an unfinished UTF-8 character
    (a byte-level token can end mid-character, which decodes as U+FFFD until the next token completes it)."""

    def __init__(self, tokenizer, stop_tokens: set[int] = frozenset(), out: TextIO | None = None):
        self.tokenizer = tokenizer
        self.stop_tokens = set(stop_tokens)
        self.out = out or sys.stdout
        self.printed = ""

    def _text(self, tokens: list[int]) -> str:
        tokens = [t for t in tokens if t not in self.stop_tokens]
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def update(self, tokens: list[int]) -> None:
        text = self._text(tokens)
        if text.endswith("\ufffd"):
            return
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text

    def finish(self, tokens: list[int]) -> str:
        """Write whatever is left and a newline; returns the full text."""
        text = self._text(tokens)
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed):])
        self.out.write("\n")
        self.out.flush()
        self.printed = ""
        return text
