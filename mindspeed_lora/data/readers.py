"""Raw samples for preprocessing, streamed from .jsonl / .json / .parquet / .csv files and directories of them.

``--input`` is a file, a directory (its data files, sorted by name, not recursive) or a comma-separated list
of those; ``path#N`` takes N samples of that path, chosen with ``--seed`` (repeating the whole path when N is
larger than it, as ms-swift does), kept in file order. Nothing is loaded whole: JSON Lines are passed on as
raw bytes (a worker parses them), JSON arrays are decoded element by element, parquet row group by row group.

A record is ``(Location, payload)``; the payload is one JSON line's bytes, a dict, or the ``SampleError`` the
reader found for that sample (so that ``--skip-bad-samples`` can count it like any other bad sample).
Problems with a whole file (unreadable, not parquet, a JSON array that breaks off) are ``UserError``.
"""
from __future__ import annotations

import codecs
import csv
import json
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import numpy as np

from mindspeed_lora.errors import UserError

EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of bytes that are not UTF-8
_WS = re.compile(r"[ \t\n\r]*")


class SampleError(Exception):
    """One bad sample. ``kind`` groups skipped samples in the summary; the message says what was expected."""

    def __init__(self, kind: str, message: str):
        super().__init__(kind, message)
        self.kind = kind
        self.message = message


class Location(NamedTuple):
    path: str
    line: int | None  # 1-based line where the sample starts (text files); None for parquet
    index: int  # 0-based sample index in the file

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.path} row {self.index + 1}"
        return f"{self.path}:{self.line} (sample {self.index + 1})"


@dataclass(frozen=True)
class InputSource:
    spec: str  # as the user wrote it
    files: tuple[str, ...]
    sample_count: int | None  # the N of ``path#N``
    ignored: tuple[str, ...] = ()  # files of a directory that are not data files


def parse_inputs(text: str) -> list[InputSource]:
    """``--input`` -> sources; raises UserError for a missing path, an unknown extension or an empty dir."""
    if not text:
        raise UserError("--input is required: a .json/.jsonl/.parquet/.csv file, a directory of them, "
                        "or a comma-separated list (path#N takes N samples)")
    parts = [text] if os.path.exists(text) else [p.strip() for p in text.split(",") if p.strip()]
    return [_parse_one(p) for p in parts]


def _parse_one(spec: str) -> InputSource:
    path, count = spec, None
    m = re.fullmatch(r"(.*)#(\d+)", spec)
    if m and not os.path.exists(spec):
        path, count = m.group(1), int(m.group(2))
        if count < 1:
            raise UserError(f"--input {spec!r}: N in path#N must be >= 1")
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if not n.startswith("."))
        files = [os.path.join(path, n) for n in names if n.endswith(EXTENSIONS)]
        ignored = [os.path.join(path, n) for n in names
                   if not n.endswith(EXTENSIONS) and os.path.isfile(os.path.join(path, n))]
        if not files:
            raise UserError(f"--input {path}: directory has no {'/'.join(EXTENSIONS)} files")
        return InputSource(spec, tuple(files), count, tuple(ignored))
    if not os.path.isfile(path):
        raise UserError(f"--input {path}: no such file or directory")
    if not path.endswith(EXTENSIONS):
        raise UserError(f"--input {path}: unsupported file type; expected one of {', '.join(EXTENSIONS)}")
    return InputSource(spec, (path,), count)


# ----------------------------------------------------------------------------------------------- one file


def iter_file(path: str) -> Iterator[tuple[Location, object]]:
    if path.endswith(".parquet"):
        yield from _iter_parquet(path)
    elif path.endswith(".csv"):
        yield from _iter_csv(path)
    elif path.endswith(".json") and _first_char(path) == "[":
        yield from _JsonArrayReader(path)
    else:  # .jsonl, and .json files holding one object per line
        yield from _iter_jsonl(path)


def count_file(path: str) -> int:
    if path.endswith(".parquet"):
        return _parquet_file(path).metadata.num_rows
    if path.endswith(".jsonl") or (path.endswith(".json") and _first_char(path) != "["):
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    return sum(1 for _ in iter_file(path))


def _first_char(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(codecs.BOM_UTF8 + b" \t\r\n")
    return head[:1].decode("latin-1")


def _iter_jsonl(path: str):
    with open(path, "rb") as f:
        index = 0
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            if raw.isspace() or not raw:
                continue
            yield Location(path, line_no, index), raw
            index += 1


class _JsonArrayReader:
    """Streams the objects of a JSON array (``[{...}, {...}]``) without holding the file."""

    CHUNK = 1 << 20

    def __init__(self, path: str):
        self.path = path
        self._decoder = json.JSONDecoder()

    def __iter__(self):
        self._file = open(self.path, "rb")
        self._text = codecs.getincrementaldecoder("utf-8-sig")(errors="surrogateescape")
        self.buf, self.pos, self.line, self.eof = "", 0, 1, False
        try:
            yield from self._elements()
        finally:
            self._file.close()

    def _fill(self) -> bool:
        data = self._file.read(self.CHUNK)
        if self.pos > self.CHUNK:  # drop what was consumed, so memory stays at about one chunk
            self.buf, self.pos = self.buf[self.pos:], 0
        self.buf += self._text.decode(data, final=not data)
        self.eof = not data
        return bool(data)

    def _advance(self, new_pos: int) -> None:
        self.line += self.buf.count("\n", self.pos, new_pos)
        self.pos = new_pos

    def _peek(self) -> str:
        """Skip whitespace; the next character ('' at the end of the file)."""
        while True:
            self._advance(_WS.match(self.buf, self.pos).end())
            if self.pos < len(self.buf) or not self._fill():
                return self.buf[self.pos:self.pos + 1]

    def _fail(self, what: str, at: int | None = None):
        line = self.line if at is None else self.line + self.buf.count("\n", self.pos, at)
        raise UserError(f"{self.path}:{line}: {what}; expected a JSON array of objects "
                        "(a broken JSON array cannot be skipped; JSON Lines can)")

    def _elements(self):
        if self._peek() != "[":
            self._fail("the file does not start with '['")
        self._advance(self.pos + 1)
        index = 0
        if self._peek() == "]":
            self._advance(self.pos + 1)
        else:
            while True:
                self._peek()
                while True:
                    try:
                        obj, end = self._decoder.raw_decode(self.buf, self.pos)
                        if end < len(self.buf) or self.eof:
                            break
                    except json.JSONDecodeError as e:
                        if self.eof:
                            self._fail(f"malformed JSON ({e.msg})", e.pos)
                    self._fill()  # the element may continue past what has been read so far
                loc = Location(self.path, self.line, index)
                if _NOT_UTF8.search(self.buf, self.pos, end):
                    obj = SampleError("not UTF-8", "text with bytes that are not valid UTF-8; expected UTF-8")
                self._advance(end)
                yield loc, obj
                index += 1
                sep = self._peek()
                if sep == "]":
                    self._advance(self.pos + 1)
                    break
                if sep != ",":
                    self._fail(f"found {sep!r} after an element" if sep else "the array is not closed")
                self._advance(self.pos + 1)
        if self._peek() != "":
            self._fail("extra data after the closing ']'")


def _iter_csv(path: str):
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                return
            index, start = 0, reader.line_num + 1
            for row in reader:
                loc = Location(path, start, index)
                start = reader.line_num + 1
                if not row:
                    continue
                index += 1
                if len(row) != len(header):
                    yield loc, SampleError("wrong type", f"row has {len(row)} fields; expected {len(header)} "
                                                         f"as in the header {header}")
                elif any(_NOT_UTF8.search(v) for v in row):
                    yield loc, SampleError("not UTF-8", "bytes that are not valid UTF-8; expected UTF-8")
                else:
                    yield loc, dict(zip(header, row))
        except csv.Error as e:
            raise UserError(f"{path}:{reader.line_num}: malformed CSV ({e})") from e


def _parquet_file(path: str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise UserError(f"{path}: not a readable parquet file ({e})") from e


def _iter_parquet(path: str):
    pf = _parquet_file(path)
    index = 0
    for batch in pf.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            yield Location(path, None, index), row
            index += 1


# ----------------------------------------------------------------------------------------------- all inputs


def _records_of_files(files, on_empty_file: Callable[[str], None]):
    for path in files:
        empty = True
        for record in iter_file(path):
            empty = False
            yield record
        if empty:
            on_empty_file(path)


def _sampled(source: InputSource, seed: int, position: int, on_empty_file):
    """``path#N``: whole passes over the source while N exceeds its size, then a seeded subset in file order."""
    total = 0
    for path in source.files:
        n = count_file(path)
        if n == 0:
            on_empty_file(path)
        total += n
    if total == 0:
        return
    full, rest = divmod(source.sample_count, total)
    for _ in range(full):
        yield from _records_of_files(source.files, lambda p: None)
    if rest:
        rng = np.random.default_rng([seed, position])
        chosen = np.sort(rng.choice(total, size=rest, replace=False))
        k = 0
        for i, record in enumerate(_records_of_files(source.files, lambda p: None)):
            if i == chosen[k]:
                yield record
                k += 1
                if k == len(chosen):
                    return


def iter_records(sources: list[InputSource], seed: int = 1234, max_samples: int | None = None,
                 on_empty_file: Callable[[str], None] | None = None) -> Iterator[tuple[Location, object]]:
    """All records of ``sources`` in order; at most ``max_samples``. An empty file calls ``on_empty_file``
    (default: UserError)."""
    if on_empty_file is None:
        def on_empty_file(path):
            raise UserError(f"{path}: empty file; expected at least one sample")
    n = 0
    for position, source in enumerate(sources):
        it = (_sampled(source, seed, position, on_empty_file) if source.sample_count is not None
              else _records_of_files(source.files, on_empty_file))
        for record in it:
            if max_samples is not None and n >= max_samples:
                return
            yield record
            n += 1


def known_total(sources: list[InputSource], max_samples: int | None) -> int | None:
    """How many records ``iter_records`` will give, where that is cheap to know (for the progress bar)."""
    total = 0
    for source in sources:
        if source.sample_count is not None:
            total += source.sample_count
        elif all(f.endswith((".jsonl", ".parquet")) for f in source.files):
            total += sum(count_file(f) for f in source.files)
        else:
            return max_samples
    return total if max_samples is None else min(total, max_samples)
