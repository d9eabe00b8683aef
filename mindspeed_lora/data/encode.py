"""One chunk of raw samples -> int32 arrays per output key (what a preprocessing worker does).

Per SFT sample: ``input_ids``; ``labels`` = input_ids on response segments (every assistant turn) and -100
on everything else (prefix, system, user turns, separators), not shifted; ``attention_mask`` 1 (0 on the
padding of ``--pad-to-multiple-of``). Pairwise samples give chosen_/rejected_ input_ids and labels, where
only the final answer is trained. ``--append-eod`` adds the eos token (trained) at the end.

Samples whose length reaches the limit are dropped and counted, never truncated: ``>= --seq-length``
without packing, longer than the pack capacity with it.
"""
from __future__ import annotations

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


class _Stream:
    """The sequences of one output (all samples, or all chosen / all rejected answers) of a chunk, flat.

    Labels and the attention mask are built with numpy at the end from the ranges recorded here, not token
    by token in Python.
    """

    def __init__(self):
        self.ids: list[int] = []
        self.lengths: list[int] = []
        self.masked: list[tuple[int, int]] = []  # label -100
        self.padding: list[tuple[int, int]] = []  # attention_mask 0
        self.eos_at: list[int] = []  # efficient_eos: labelled eos

    def add(self, segments, pad: int, pad_id: int) -> None:
        """segments: (ids, trained, eos_first) in order; then ``pad`` padding tokens."""
        ids = self.ids
        begin = len(ids)
        for seg, trained, eos_first in segments:
            if not seg:
                continue
            s = len(ids)
            ids += seg
            if not trained:
                if eos_first:
                    self.eos_at.append(s)
                    s += 1
                if s < len(ids):
                    self.masked.append((s, len(ids)))
        if pad:
            s = len(ids)
            ids += [pad_id] * pad
            self.masked.append((s, s + pad))
            self.padding.append((s, s + pad))
        self.lengths.append(len(ids) - begin)

    def arrays(self, eos_id: int | None):
        ids = np.asarray(self.ids, dtype=np.int32)
        lengths = np.asarray(self.lengths, dtype=np.int32)
        labels = ids.copy()
        labels[_in_ranges(self.masked, ids.size)] = IGNORE_INDEX
        if self.eos_at:
            labels[self.eos_at] = eos_id
        mask = np.ones_like(ids)
        mask[_in_ranges(self.padding, ids.size)] = 0
        return ids, labels, mask, lengths


def _in_ranges(ranges: list[tuple[int, int]], n: int) -> np.ndarray:
    """Boolean mask of the positions inside disjoint, non-empty [start, end) ranges."""
    delta = np.zeros(n + 1, dtype=np.int32)
    if ranges:
        r = np.asarray(ranges, dtype=np.int64)
        delta[r[:, 0]] += 1
        delta[r[:, 1]] -= 1
    return np.cumsum(delta[:-1]) > 0


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
            streams = self._pretrain(converted, result)
        else:
            streams = self._chat(converted, result, 1 if kind == "sft" else 2)
        eos = self.template.eos_id if self.template is not None else None
        for name, stream in zip(self._stream_names(), streams):
            ids, labels, mask, lengths = stream.arrays(eos)
            result.tokens += int(lengths.sum())
            result.padding_tokens += int(np.count_nonzero(mask == 0))
            if kind == "pretrain":
                result.arrays[name] = (ids, lengths)
                continue
            result.trained_tokens += int(np.count_nonzero(labels != IGNORE_INDEX))
            result.arrays[name + "input_ids"] = (ids, lengths)
            result.arrays[name + "labels"] = (labels, lengths)
            if kind == "sft" and self.options.attention_mask:
                result.arrays["attention_mask"] = (mask, lengths)
        return result

    def _stream_names(self):
        kind = self.handler.kind
        return self.handler.json_keys if kind == "pretrain" else ("",) if kind == "sft" else ("chosen_", "rejected_")

    # -- pretraining text

    def _pretrain(self, converted, result):
        o = self.options
        keys = self.handler.json_keys
        streams = [_Stream() for _ in keys]
        texts = [t for _, sample in converted for t in sample]
        ids = iter(self.text.encode_documents(texts))
        tail = [o.eod_id] if o.append_eod else []
        for i, sample in converted:
            docs = [next(ids) + tail for _ in keys]
            if any(not t for t in sample):
                result.drops.append((i, "empty text"))
                continue
            for stream, doc in zip(streams, docs):
                stream.add([(doc, True, False)], -len(doc) % o.pad_to_multiple_of, o.pad_id)
        return streams

    # -- conversations and preference pairs

    def _chat(self, converted, result, n_streams):
        o, t = self.options, self.template
        strings: dict[str, int] = {}
        plans = []  # per sample, per stream: [(refs, trained)]; ref >= 0: a string, ref < 0: token id -ref - 1

        def refs(pieces):
            return [strings.setdefault(p, len(strings)) if isinstance(p, str) else -p - 1 for p in pieces]

        for i, sample in converted:
            if isinstance(sample, Conversation):
                segments = t.render(sample.system, sample.messages, o.enable_thinking)
                plans.append((i, [[(refs(p), trained) for p, trained in segments]]))
            else:  # a preference pair: only the final answer is trained
                seqs = []
                for answer in (sample.chosen, sample.rejected):
                    segments = t.render(sample.system, sample.prompt + [("assistant", answer)], o.enable_thinking)
                    last = len(segments) - 1
                    seqs.append([(refs(p), k == last) for k, (p, _) in enumerate(segments)])
                plans.append((i, seqs))
        encoded = self.text.encode(list(strings))
        tail = ([t.eos_id] if t.spec.efficient_eos else []) + ([o.eod_id] if o.append_eod else [])
        streams = [_Stream() for _ in range(n_streams)]
        # efficient_eos: answers carry no eos token; in multi-turn SFT the label of each later prompt's first
        # token is eos instead, so the answer before it learns to end (MindSpeed-LLM / LLaMA-Factory do this)
        eos_first = t.spec.efficient_eos and n_streams == 1
        for i, seqs in plans:
            built = []
            for seq in seqs:
                segments = []
                for k, (seg_refs, trained) in enumerate(seq):
                    seg = []
                    for r in seg_refs:
                        if r >= 0:
                            seg += encoded[r]
                        else:
                            seg.append(-r - 1)
                    segments.append((seg, trained, eos_first and k > 0 and not trained))
                segments.append((tail, True, False))
                length = sum(len(s) for s, _, _ in segments)
                built.append((segments, length, -length % o.pad_to_multiple_of))
            reason = self._drop_reason(built)
            if reason:
                result.drops.append((i, reason))
                continue
            for stream, (segments, _, pad) in zip(streams, built):
                stream.add(segments, pad, o.pad_id)
        return streams

    def _drop_reason(self, built) -> str | None:
        o = self.options
        for _, length, pad in built:
            if length == 0:
                return "empty sample"
            if o.max_length is not None and length + pad > o.max_length:
                return o.too_long
        return None


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
