"""The preprocessing job: raw samples -> Megatron indexed datasets, in parallel, deterministic, atomic.

    read (main process, streaming)  ->  chunks of 512 samples  ->  workers: parse, template, tokenize
    ->  main: write chunks in input order  ->  [--pack: knapsack over the lengths, write packs]
    ->  summary  ->  rename everything into place

Determinism: workers only transform chunks; the main process writes results in chunk order and packs from
the lengths alone, so the bytes do not depend on ``--workers``. Memory: at most ``2 * workers + 2`` chunks
are in flight, and per written sample only its lengths are kept (4 bytes per key).

Atomicity: everything is written into a hidden ``.{name}.tmp-*`` directory beside the outputs and renamed
into place at the end (Ctrl-C and SIGTERM stop the job at the next chunk, never during those renames: see
``Interrupts``); an interrupted or failed run removes that directory, and a killed one leaves only it, never a
file under a final name.
"""
from __future__ import annotations

import collections
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field

import numpy as np

from mindspeed_lora.data import readers
from mindspeed_lora.data.encode import ChunkResult, EncodeOptions, EncoderState, SampleEncoder
from mindspeed_lora.data.handlers import HANDLERS, make_handler
from mindspeed_lora.data.indexed_writer import IndexedDatasetWriter, output_prefix
from mindspeed_lora.errors import UserError

CHUNK_SIZE = 512
EXAMPLES_KEPT = 20  # locations listed per drop / skip reason in the summary


@dataclass
class PreprocessConfig:
    """preprocess_data.py's flags, checked."""

    input: str  # file, directory, comma-separated list; path#N takes N samples
    output_prefix: str
    handler_name: str
    tokenizer_name_or_path: str
    tokenizer_not_use_fast: bool = False
    prompt_type: str | None = None  # template name (instruction and pairwise handlers)
    prompt_type_path: str | None = None  # templates.json; default configs/finetune/templates.json
    map_keys: str | dict | None = None  # JSON object renaming columns
    json_keys: tuple[str, ...] = ("text",)  # GeneralPretrainHandler's text columns
    workers: int = 1
    log_interval: int = 1000  # samples between progress-bar refreshes
    seq_length: int | None = None
    pack: bool = False
    neat_pack: bool = False  # implies pack
    pad_to_multiple_of: int = 1
    enable_thinking: bool | None = None
    append_eod: bool = False
    max_samples: int | None = None
    seed: int = 1234  # for path#N
    model_name: str | None = None  # replaces <NAME> in the samples
    model_author: str | None = None  # replaces <AUTHOR> in the samples
    skip_bad_samples: bool = False  # count bad samples in the summary instead of stopping
    progress: bool = True

    def __post_init__(self):
        if self.neat_pack:
            self.pack = True
        if self.handler_name not in HANDLERS:
            raise UserError(f"--handler-name {self.handler_name!r}: unknown handler; expected one of "
                            f"{', '.join(HANDLERS)}")
        kind = HANDLERS[self.handler_name]
        if not self.output_prefix:
            raise UserError("--output-prefix is required")
        if self.workers < 1:
            raise UserError(f"--workers {self.workers}: expected >= 1")
        if self.log_interval < 1:
            raise UserError(f"--log-interval {self.log_interval}: expected >= 1")
        if self.pad_to_multiple_of < 1:
            raise UserError(f"--pad-to-multiple-of {self.pad_to_multiple_of}: expected >= 1")
        if self.max_samples is not None and self.max_samples < 1:
            raise UserError(f"--max-samples {self.max_samples}: expected >= 1")
        if self.seq_length is not None and self.seq_length < 2:
            raise UserError(f"--seq-length {self.seq_length}: expected >= 2")
        if kind != "sft" and (self.pack or self.neat_pack):
            raise UserError(f"--pack / --neat-pack: only for instruction data, not {self.handler_name} "
                            "(pretraining text is packed by the training dataset)")
        if self.pack and self.seq_length is None:
            raise UserError("--pack / --neat-pack need --seq-length (the length of every pack)")
        if self.pack and self.seq_length - 1 < self.pad_to_multiple_of:
            raise UserError(f"--seq-length {self.seq_length}: too short for --pad-to-multiple-of "
                            f"{self.pad_to_multiple_of}")
        if kind != "pretrain" and not self.prompt_type:
            raise UserError(f"--prompt-type is required for {self.handler_name} (a template name from "
                            "configs/finetune/templates.json, e.g. qwen3, llama3, chatml, alpaca, empty)")

    @property
    def kind(self) -> str:
        return HANDLERS[self.handler_name]

    @classmethod
    def from_args(cls, args) -> "PreprocessConfig":
        return cls(
            input=args.input, output_prefix=args.output_prefix, handler_name=args.handler_name,
            tokenizer_name_or_path=args.tokenizer_name_or_path,
            tokenizer_not_use_fast=args.tokenizer_not_use_fast, prompt_type=args.prompt_type,
            prompt_type_path=args.prompt_type_path, map_keys=args.map_keys, json_keys=tuple(args.json_keys),
            workers=args.workers, log_interval=args.log_interval, seq_length=args.seq_length, pack=args.pack,
            neat_pack=args.neat_pack, pad_to_multiple_of=args.pad_to_multiple_of,
            enable_thinking=args.enable_thinking, append_eod=args.append_eod, max_samples=args.max_samples,
            seed=args.seed, model_name=args.model_name, model_author=args.model_author,
            skip_bad_samples=args.skip_bad_samples, progress=not args.no_progress,
        )


# ---------------------------------------------------------------------------------------------- set-up


def build_encoder_state(cfg: PreprocessConfig) -> EncoderState:
    """Tokenizer, template and handler, resolved in the main process (workers get this, pickled)."""
    from mindspeed_lora.data.encoder import load_hf_tokenizer, tokenizer_spec
    from mindspeed_lora.data.templates import ChatTemplate, load_template

    use_fast = not cfg.tokenizer_not_use_fast
    tokenizer = load_hf_tokenizer(cfg.tokenizer_name_or_path, use_fast)
    handler = make_handler(cfg.handler_name, cfg.map_keys, cfg.json_keys, cfg.model_name, cfg.model_author)
    template = None
    if cfg.kind == "pretrain":
        eod_id = tokenizer.eos_token_id
    else:
        template = ChatTemplate.bind(load_template(cfg.prompt_type, cfg.prompt_type_path), tokenizer)
        eod_id = template.eos_id
    if cfg.append_eod and eod_id is None:
        raise UserError(f"--append-eod: the tokenizer {cfg.tokenizer_name_or_path} has no eos token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eod_id
    if pad_id is None and (cfg.pack or cfg.pad_to_multiple_of > 1):
        raise UserError(f"the tokenizer {cfg.tokenizer_name_or_path} has neither a pad nor an eos token to pad "
                        "with")
    max_length, too_long = None, ""
    if cfg.pack:
        max_length = (cfg.seq_length - 1) // cfg.pad_to_multiple_of * cfg.pad_to_multiple_of
        rounded = ", rounded down to --pad-to-multiple-of" if max_length != cfg.seq_length - 1 else ""
        too_long = f"longer than the pack capacity {max_length} (--seq-length - 1{rounded})"
    elif cfg.seq_length is not None and cfg.kind != "pretrain":
        max_length = cfg.seq_length - 1
        too_long = f"length >= --seq-length {cfg.seq_length}"
    options = EncodeOptions(
        enable_thinking=cfg.enable_thinking, append_eod=cfg.append_eod, eod_id=eod_id,
        pad_id=pad_id if pad_id is not None else 0, pad_to_multiple_of=cfg.pad_to_multiple_of,
        max_length=max_length, too_long=too_long, attention_mask=not cfg.pack,
    )
    return EncoderState(handler, template, tokenizer_spec(tokenizer, cfg.tokenizer_name_or_path, use_fast),
                        options)


# ---------------------------------------------------------------------------------------------- workers

_WORKER: SampleEncoder | None = None
_WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}


def _init_worker(state: EncoderState) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    global _WORKER
    _WORKER = SampleEncoder(state)


def _encode_in_worker(payloads: list) -> ChunkResult:
    return _WORKER.encode_chunk(payloads)


def _chunks(records):
    locations, payloads = [], []
    for loc, payload in records:
        locations.append(loc)
        payloads.append(payload)
        if len(payloads) == CHUNK_SIZE:
            yield locations, payloads
            locations, payloads = [], []
    if payloads:
        yield locations, payloads


def _result(job, locations) -> ChunkResult:
    try:
        return job.result()
    except BrokenProcessPool:
        raise UserError(f"a --workers process died while the samples from {locations[0]} on were being encoded "
                        "(killed from outside, e.g. for memory: see dmesg); nothing was written; rerun with fewer "
                        "--workers") from None


def encoded_chunks(state: EncoderState, records, workers: int):
    """(locations, ChunkResult) per chunk, in input order; a bounded number of chunks in flight."""
    if workers == 1:
        encoder = SampleEncoder(state)
        for locations, payloads in _chunks(records):
            yield locations, encoder.encode_chunk(payloads)
        return
    # spawn, not fork: the parent holds tokenizer threads that fork would copy. One tokenizer thread per
    # worker: the workers already use the cores, and tokenizers' thread pool on top of them made 2 workers
    # slower than 1 on 2 cores. Children read these variables at start.
    # A process pool from concurrent.futures, not multiprocessing.Pool: Pool.terminate() can kill a worker
    # halfway through sending a result, and its result thread then waits forever for the rest (Ctrl-C hung).
    # The executor also reports a worker that died (e.g. killed for memory) instead of waiting on it.
    saved = {k: os.environ.get(k) for k in _WORKER_ENV}
    os.environ.update(_WORKER_ENV)
    try:
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                   initargs=(state,))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    try:
        pending = collections.deque()
        for locations, payloads in _chunks(records):
            pending.append((locations, pool.submit(_encode_in_worker, payloads)))
            if len(pending) >= 2 * workers + 2:
                locations, job = pending.popleft()
                yield locations, _result(job, locations)
        while pending:
            locations, job = pending.popleft()
            yield locations, _result(job, locations)
    finally:  # on an error or Ctrl-C: drop the queued chunks, let the few running ones finish, workers exit
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------- the job


@dataclass
class Stats:
    read: int = 0
    written: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    padding_tokens: int = 0
    packs: int | None = None
    dropped: dict = field(default_factory=lambda: collections.defaultdict(int))
    skipped: dict = field(default_factory=lambda: collections.defaultdict(int))
    examples: dict = field(default_factory=lambda: collections.defaultdict(list))

    def note(self, table: dict, reason: str, where: str) -> None:
        table[reason] += 1
        if len(self.examples[reason]) < EXAMPLES_KEPT:
            self.examples[reason].append(where)


def run_preprocess(cfg: PreprocessConfig) -> dict:
    """Run the job; returns the summary (also written to ``{prefix}_summary.json`` and printed)."""
    start = time.time()
    sources = readers.parse_inputs(cfg.input)
    state = build_encoder_state(cfg)
    keys = state.handler.output_keys
    final = {k: output_prefix(cfg.output_prefix, k, cfg.kind) for k in keys}
    out_dir = os.path.dirname(os.path.abspath(cfg.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    _note_leftovers(out_dir, os.path.basename(cfg.output_prefix))
    staging = os.path.join(out_dir, f".{os.path.basename(cfg.output_prefix)}.tmp-{os.getpid()}-"
                                    f"{uuid.uuid4().hex[:8]}")
    interrupts = Interrupts()
    try:
        os.makedirs(staging)
        staged = {k: os.path.join(staging, os.path.basename(p)) for k, p in final.items()}
        stats = Stats()
        _write(cfg, state, sources, staged, stats, interrupts)
        summary = _summary(cfg, sources, final, stats, time.time() - start)
        summary_path = f"{cfg.output_prefix}_summary.json"
        with open(os.path.join(staging, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, ensure_ascii=False)
        moves = [(staged[k] + ext, final[k] + ext) for ext in (".bin", ".idx") for k in keys]
        moves.append((os.path.join(staging, "summary.json"), summary_path))
        interrupts.check()  # the last moment to stop: once renaming starts, all files appear
        for src, dst in moves:
            os.replace(src, dst)
    finally:
        interrupts.close()
        shutil.rmtree(staging, ignore_errors=True)
    _print_summary(summary)
    return summary


def _note_leftovers(out_dir: str, base: str) -> None:
    """A killed run leaves its staging directory; say so (not deleted: another machine may own it)."""
    for name in sorted(os.listdir(out_dir)):
        if name.startswith(f".{base}.tmp-"):
            print(f"preprocess_data: {os.path.join(out_dir, name)} is left over from an interrupted run "
                  "(safe to delete if no other run writes this prefix)", file=sys.stderr)


def _interruptible(chunks, interrupts: Interrupts):
    try:
        for item in chunks:
            interrupts.check()
            yield item
    except UserError:
        interrupts.check()  # a Ctrl-C of the whole process group that killed a starting worker is a Ctrl-C
        raise


def _write(cfg, state, sources, staged, stats: Stats, interrupts: Interrupts) -> None:
    from tqdm import tqdm

    keys = state.handler.output_keys
    unpacked_keys = ("input_ids", "labels") if cfg.pack else keys
    unpacked = {k: IndexedDatasetWriter(staged[k] + (".unpacked" if cfg.pack else "")) for k in unpacked_keys}

    def empty_file(path):
        if not cfg.skip_bad_samples:
            raise UserError(f"{path}: empty file; expected at least one sample")
        stats.note(stats.skipped, "empty file", path)

    records = readers.iter_records(sources, cfg.seed, cfg.max_samples, empty_file)
    tty = sys.stderr.isatty()
    total = readers.known_total(sources, cfg.max_samples) if cfg.progress else None
    bar = tqdm(total=total, unit=" samples", desc="preprocess",
               disable=not cfg.progress, miniters=cfg.log_interval, mininterval=0.5 if tty else 30,
               dynamic_ncols=True)
    chunks = encoded_chunks(state, records, cfg.workers)
    try:
        for locations, result in _interruptible(chunks, interrupts):
            stats.read += result.n
            for i, kind, message in result.errors:
                if not cfg.skip_bad_samples:
                    raise UserError(f"{locations[i]}: {message} (--skip-bad-samples skips such samples)")
                stats.note(stats.skipped, kind, f"{locations[i]}: {message}")
            for i, reason in result.drops:
                stats.note(stats.dropped, reason, str(locations[i]))
            for k, (tokens, lengths) in result.arrays.items():
                unpacked[k].add(tokens, lengths)
            stats.written += len(result.arrays[keys[0]][1])
            stats.tokens += result.tokens
            stats.trained_tokens += result.trained_tokens
            stats.padding_tokens += result.padding_tokens
            bar.update(result.n)
            bar.set_postfix(written=stats.written, refresh=False)
    finally:  # the workers stop here, not whenever the generator is collected
        chunks.close()
        bar.close()
    if stats.written == 0:
        raise UserError(f"--input {cfg.input}: no sample was written ({stats.read} read, "
                        f"{sum(stats.dropped.values())} dropped, {sum(stats.skipped.values())} skipped); "
                        "see the reasons above")
    if cfg.pack:  # the unpacked samples are only read back by the packer
        for w in unpacked.values():
            w.close()
        _write_packs(cfg, state, staged, unpacked, stats, interrupts)
    else:
        for w in unpacked.values():
            w.finalize()


def _write_packs(cfg, state, staged, unpacked, stats: Stats, interrupts: Interrupts) -> None:
    from tqdm import tqdm

    from mindspeed_lora.data.packing import PackWriter, greedy_knapsack

    lengths = np.frombuffer(unpacked["input_ids"]._lengths, dtype=np.int32)
    capacity = state.options.max_length
    reader = PackWriter({k: w.path_prefix + ".bin" for k, w in unpacked.items()}, lengths)
    writers = {k: IndexedDatasetWriter(p) for k, p in staged.items()}
    stats.packs = 0
    try:
        packs = greedy_knapsack(lengths, capacity)
        for indices in tqdm(packs, unit=" packs", desc="pack", disable=not cfg.progress, mininterval=0.5):
            interrupts.check()
            pack = reader.pack(indices, cfg.seq_length, state.options.pad_id, cfg.neat_pack)
            for k, w in writers.items():
                w.add(pack[k], np.array([cfg.seq_length], dtype=np.int32))
            stats.packs += 1
        for w in writers.values():
            w.finalize()
    finally:
        reader.close()
    stats.padding_tokens += stats.packs * cfg.seq_length - int(lengths.sum())
    stats.tokens = stats.packs * cfg.seq_length


class Interrupts:
    """Ctrl-C (SIGINT) and SIGTERM during the job only set a flag; ``check`` stops the job at a chunk boundary.

    Python raises KeyboardInterrupt wherever the main thread happens to be, including inside a finalizer, where
    it is printed and dropped (the run then carried on and finished); the process pool's own threads and locks
    are also no place for it. So the handler records the signal and the job raises at the next ``check`` (one
    chunk later at most): KeyboardInterrupt for SIGINT, SystemExit(128 + n) for SIGTERM; the staging directory
    is removed on the way out. A signal that comes once the outputs are being renamed lets the renames finish:
    a run ends with all of its files or none. (Handlers, not a signal mask: CPython runs handlers in the main
    thread whichever thread the OS picked.)"""

    def __init__(self):
        import threading

        self.signum: int | None = None
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._note) for s in (signal.SIGINT, signal.SIGTERM)}

    def _note(self, signum, frame) -> None:
        self.signum = signum

    def check(self) -> None:
        if self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is not None:
            raise SystemExit(128 + self.signum)

    def close(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}


def _summary(cfg, sources, final, stats: Stats, seconds: float) -> dict:
    args = asdict(cfg)
    args.pop("progress")
    files = [p + ext for p in final.values() for ext in (".bin", ".idx")]
    ignored = [f for s in sources for f in s.ignored]
    return {
        "handler": cfg.handler_name,
        "outputs": files,
        "samples_read": stats.read,
        "samples_written": stats.written,
        "packs_written": stats.packs,
        "dropped": dict(stats.dropped),
        "skipped_bad_samples": dict(stats.skipped),
        "examples": {k: v for k, v in stats.examples.items()},
        "tokens": stats.tokens,
        "trained_tokens": stats.trained_tokens if cfg.kind != "pretrain" else None,
        "padding_tokens": stats.padding_tokens,
        "ignored_files": ignored,
        "seconds": round(seconds, 3),
        "samples_per_second": round(stats.read / seconds, 1) if seconds > 0 else None,
        "args": args,
    }


def _print_summary(s: dict) -> None:
    lines = [f"preprocess_data: {s['samples_read']} samples read, {s['samples_written']} written"
             + (f" into {s['packs_written']} packs" if s["packs_written"] is not None else "")
             + f", {s['tokens']} tokens"
             + (f" ({s['trained_tokens']} trained)" if s["trained_tokens"] is not None else "")
             + f", {s['seconds']:.1f} s ({s['samples_per_second']} samples/s)"]
    for title, table in (("dropped", s["dropped"]), ("skipped", s["skipped_bad_samples"])):
        for reason, n in table.items():
            first = s["examples"].get(reason, [])[:3]
            lines.append(f"  {title} {n}: {reason}" + (f"  e.g. {'; '.join(first)}" if first else ""))
    for f in s["ignored_files"]:
        lines.append(f"  ignored (not a data file): {f}")
    lines.append("  outputs: " + ", ".join(s["outputs"]) + f" (+ {s['args']['output_prefix']}_summary.json)")
    print("\n".join(lines), flush=True)
