"""One chunk of raw samples -> int32 arrays per output key (what a preprocessing worker does).

Per SFT sample: ``input_ids``; ``labels`` = input_ids on response segments (every assistant turn) and -100
on everything else (prefix, system, user turns, separators), not shifted; ``attention_mask`` 1 (0 on the
padding of ``--pad-to-multiple-of``). Pairwise samples give chosen_/rejected_ input_ids and labels, where
only the final answer is trained. ``--append-eod`` adds the eos token (trained) at the end.

Samples whose length reaches the limit are dropped and counted, never truncated: ``>= --seq-length``
without packing, longer than the pack capacity with it.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field

import numpy as np

from mindspeed_lora.data.encoder import TextEncoder, TokenizerSpec
from mindspeed_lora.data.handlers import Conversation, Handler
from mindspeed_lora.data.readers import SampleError
from mindspeed_lora.data.templates import ChatTemplate

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodeOptions:
    enable_thinking: bool | None
    append_eod: bool
    eod_id: int | None
    pad_id: int
    pad_to_multiple_of: int
    max_length: int | None  # longest sample kept (None: no limit)
    too_long: str  # the drop reason for longer samples
    attention_mask: bool  # write attention_mask (SFT without packing)


@dataclass
class ChunkResult:
    n: int
    arrays: dict[str, tuple[np.ndarray, np.ndarray]]  # key -> (flat int32 tokens, int32 lengths) of kept samples
    errors: list[tuple[int, str, str]] = field(default_factory=list)  # (position in chunk, kind, message)
    drops: list[tuple[int, str]] = field(default_factory=list)  # (position in chunk, reason)
    tokens: int = 0  # input tokens kept (with padding)
    trained_tokens: int = 0
    padding_tokens: int = 0


@dataclass(frozen=True)
class EncoderState:
    """Everything a worker needs, picklable."""

    handler: Handler
    template: ChatTemplate | None
    tokenizer: TokenizerSpec
    options: EncodeOptions


class _Index(dict):
    """Piece -> its position in the chunk's table, numbering new pieces as they come (a chunk's repeated
    pieces, e.g. a shared system prompt, are tokenized once)."""

    def __missing__(self, key):
        self[key] = n = len(self)
        return n


@dataclass
class _Layout:
    """A chunk's sequences as references into a table of token-id lists, in output order: sequences are
    sample-major (sample 0's streams, then sample 1's), a sequence is segments, a segment is pieces.

    The tokens, labels and masks are then built for the whole chunk at once with numpy (``_assemble``)
    rather than list by list in Python."""

    refs: list[int] = field(default_factory=list)  # table position of each piece
    seg_pieces: list[int] = field(default_factory=list)
    seg_trained: list[bool] = field(default_factory=list)
    seg_eos: list[bool] = field(default_factory=list)  # efficient_eos: the first token is labelled eos
    seq_segments: list[int] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)  # position in the chunk of each laid-out sample

    def segment(self, refs, trained: bool, eos: bool = False) -> None:
        self.refs += refs
        self.seg_pieces.append(len(refs))
        self.seg_trained.append(trained)
        self.seg_eos.append(eos)


def _ends(counts) -> np.ndarray:
    """[0, c0, c0 + c1, ...]: where each run of ``counts`` ends (with a leading 0)."""
    ends = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=ends[1:])
    return ends


class SampleEncoder:
    def __init__(self, state: EncoderState):
        self.handler = state.handler
        self.template = state.template
        self.options = state.options
        self.text = TextEncoder(state.tokenizer)

    def encode_chunk(self, payloads: list) -> ChunkResult:
        result = ChunkResult(len(payloads), {})
        converted = []
        for i, payload in enumerate(payloads):
            try:
                converted.append((i, self.handler.convert(_as_sample(payload))))
            except SampleError as e:
                result.errors.append((i, e.kind, e.message))
        kind = self.handler.kind
        if kind == "pretrain":
            table, layout = self._pretrain(converted, result)
            names = self.handler.json_keys
        else:
            table, layout = self._chat(converted)
            names = ("",) if kind == "sft" else ("chosen_", "rejected_")
        self._assemble(table, layout, names, result)
        return result

    # -- pretraining text

    def _pretrain(self, converted, result):
        o = self.options
        keys = self.handler.json_keys
        texts = [t for _, sample in converted for t in sample]
        table = self.text.encode_documents(texts)
        tail = []
        if o.append_eod:
            tail = [len(table)]
            table.append([o.eod_id])
        layout = _Layout()
        for k, (i, sample) in enumerate(converted):
            if any(not t for t in sample):
                result.drops.append((i, "empty text"))
                continue
            layout.samples.append(i)
            for j in range(len(keys)):
                layout.segment([k * len(keys) + j] + tail, True)
                layout.seq_segments.append(1)
        return table, layout

    # -- conversations and preference pairs

    def _chat(self, converted):
        o, t = self.options, self.template
        index = _Index()
        piece = index.__getitem__
        layout = _Layout()
        tail = list(map(piece, ([t.eos_id] if t.spec.efficient_eos else []) + ([o.eod_id] if o.append_eod else [])))
        # efficient_eos: answers carry no eos token; in multi-turn SFT the label of each later prompt's first
        # token is eos instead, so the answer before it learns to end (MindSpeed-LLM / LLaMA-Factory do this)
        eos_first = t.spec.efficient_eos
        for i, sample in converted:
            layout.samples.append(i)
            if isinstance(sample, Conversation):
                segments = t.render(sample.system, sample.messages, o.enable_thinking)
                for k, (pieces, trained) in enumerate(segments):
                    layout.segment(list(map(piece, pieces)), trained, eos_first and k > 0 and not trained)
                layout.segment(tail, True)
                layout.seq_segments.append(len(segments) + 1)
            else:  # a preference pair: only the final answer is trained
                for answer in (sample.chosen, sample.rejected):
                    segments = t.render(sample.system, sample.prompt + [("assistant", answer)], o.enable_thinking)
                    last = len(segments) - 1
                    for k, (pieces, _) in enumerate(segments):
                        layout.segment(list(map(piece, pieces)), k == last)
                    layout.segment(tail, True)
                    layout.seq_segments.append(len(segments) + 1)
        # pieces are strings to tokenize (each on its own, as MindSpeed-LLM does) or token ids
        keys = list(index)
        encoded = iter(self.text.encode([k for k in keys if type(k) is str]))
        table = [next(encoded) if type(k) is str else [k] for k in keys]
        return table, layout

    # -- the chunk's arrays

    def _assemble(self, table, layout: _Layout, names, result: ChunkResult) -> None:
        o = self.options
        chat = self.handler.kind != "pretrain"
        n_streams = len(names)
        # every piece's tokens, gathered from the table in output order
        entry_len = np.fromiter(map(len, table), dtype=np.int64, count=len(table))
        entry_start = _ends(entry_len)
        flat = np.fromiter(itertools.chain.from_iterable(table), dtype=np.int32, count=int(entry_start[-1]))
        refs = np.asarray(layout.refs, dtype=np.int64)
        piece_len = entry_len[refs]
        piece_end = _ends(piece_len)
        n_tokens = int(piece_end[-1])
        ids = flat[np.repeat(entry_start[refs] - piece_end[:-1], piece_len) + np.arange(n_tokens)]
        seg_start = piece_end[_ends(layout.seg_pieces)]
        seg_len = np.diff(seg_start)
        seq_start = seg_start[_ends(layout.seq_segments)]
        seq_len = np.diff(seq_start)
        pad = -seq_len % o.pad_to_multiple_of

        keep = np.ones(len(layout.samples), dtype=bool)
        if chat:
            too_long = (seq_len + pad > o.max_length) if o.max_length is not None else np.zeros_like(seq_len, bool)
            bad = ((seq_len == 0) | too_long).reshape(-1, n_streams)
            for s in np.flatnonzero(bad.any(axis=1)):
                keep[s] = False
                first = s * n_streams + int(np.argmax(bad[s]))
                result.drops.append((layout.samples[s], "empty sample" if seq_len[first] == 0 else o.too_long))
            labels = np.where(np.repeat(np.asarray(layout.seg_trained, dtype=bool), seg_len), ids, IGNORE_INDEX)
            labels = labels.astype(np.int32, copy=False)
            eos_at = np.asarray(layout.seg_eos, dtype=bool) & (seg_len > 0)
            if eos_at.any():
                labels[seg_start[:-1][eos_at]] = self.template.eos_id
        keep_seq = np.repeat(keep, n_streams)
        for s, name in enumerate(names):
            chosen = keep_seq.copy()
            chosen[np.arange(len(chosen)) % n_streams != s] = False
            lengths, pads = seq_len[chosen], pad[chosen]
            if chosen.all():
                out = [ids, labels] if chat else [ids]
            else:
                tokens = np.repeat(chosen, seq_len)
                out = [ids[tokens], labels[tokens]] if chat else [ids[tokens]]
            mask = None
            if pads.any():  # padding after each sequence: ids pad_id, labels -100, attention_mask 0
                padded = lengths + pads
                dest = np.repeat(_ends(padded)[:-1] - _ends(lengths)[:-1], lengths) + np.arange(int(lengths.sum()))
                total = int(padded.sum())
                fills = [o.pad_id, IGNORE_INDEX]
                for k, a in enumerate(out):
                    full = np.full(total, fills[k], dtype=np.int32)
                    full[dest] = a
                    out[k] = full
                mask = np.zeros(total, dtype=np.int32)
                mask[dest] = 1
                lengths = padded
            lengths = lengths.astype(np.int32)
            result.tokens += int(lengths.sum())
            result.padding_tokens += int(pads.sum())
            if not chat:
                result.arrays[name] = (out[0], lengths)
                continue
            result.trained_tokens += int(np.count_nonzero(out[1] != IGNORE_INDEX))
            result.arrays[name + "input_ids"] = (out[0], lengths)
            result.arrays[name + "labels"] = (out[1], lengths)
            if self.handler.kind == "sft" and o.attention_mask:
                result.arrays["attention_mask"] = (mask if mask is not None else np.ones_like(out[0]), lengths)


def _as_sample(payload) -> dict:
    if isinstance(payload, SampleError):
        raise payload
    if isinstance(payload, bytes):
        try:
            payload = json.loads(payload)
        except UnicodeDecodeError as e:
            raise SampleError("not UTF-8", f"byte {e.start} is not valid UTF-8; expected UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise SampleError("malformed JSON", f"malformed JSON ({e.msg}, column {e.colno}); expected one JSON "
                                                "object per line") from None
    if not isinstance(payload, dict):
        raise SampleError("wrong type", f"the sample is {type(payload).__name__}; expected a JSON object")
    return payload
