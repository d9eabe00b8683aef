"""preprocess_data throughput vs HF ``datasets.map`` + ``tokenizer.apply_chat_template``, and its memory.

Both sides turn the same synthetic chat samples (OpenAI messages: a system prompt, one or two user /
assistant turns, English and Chinese) into input_ids + labels (-100 outside assistant answers) +
attention_mask with the same tokenizer (``--tokenizer``: the 512-token test BPE on a 30-word list, or a
32k-vocabulary BPE trained here on held-out English prose plus Chinese) and the same chatml layout,
measured in one process with all imports done beforehand; the baseline's first samples are checked to give
the same ids and labels as ours, so both do the same work. Wall-clock samples/s depend on what else the
machine runs, so CPU seconds per sample (the process and all its workers) are reported too: their ratio is
what 2 idle cores would show.
Then peak RSS of a preprocessing run (main process and each worker) on 50k and 500k samples, each in a
fresh process: streaming means it should not grow with the dataset.

    python bench/preprocess_throughput.py [--tokenizer tiny|prose] [--samples 50000] [--workers 2]
        [--repeat 3] [--rss-samples 50000 500000]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORDS_EN = ("the quick brown fox jumps over a lazy dog while the assistant explains how to cook rice, write "
            "python code, plan a trip to Paris and answer questions about history science and numbers").split()
WORDS_ZH = list("我们今天学习人工智能的基本概念然后讨论北京的天气和中国历史")
SYSTEM = "You are a helpful assistant."
# HF's renderer runs Jinja with trim_blocks, so newlines are expressions; this gives our chatml layout
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% if not loop.last %}{{ '\\n' }}{% endif %}{% else %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% if m['role'] == 'user' %}{{ '<|im_start|>assistant\\n' }}{% endif %}{% endif %}{% endfor %}")


def text(rng: random.Random, lo: int, hi: int, prose: list[str] | None = None) -> str:
    if rng.random() < 0.2:
        return "".join(rng.choice(WORDS_ZH) for _ in range(rng.randint(lo, hi)))
    if prose is not None:  # about 12 words a sentence
        return " ".join(rng.choice(prose) for _ in range(max(1, rng.randint(lo, hi) // 12)))
    return " ".join(rng.choice(WORDS_EN) for _ in range(rng.randint(lo, hi)))


def prose_sentences(half: int) -> list[str]:
    """English sentences from the docstrings of the Python standard library's sources (read with ``ast``, not
    imported), split by file into two halves: one trains the tokenizer, the other writes the samples."""
    import ast
    import glob
    import re
    import sysconfig
    import zlib

    root = sysconfig.get_paths()["stdlib"]
    out = []
    for path in sorted(glob.glob(os.path.join(root, "*.py")) + glob.glob(os.path.join(root, "*", "*.py"))):
        if zlib.crc32(os.path.relpath(path, root).encode()) % 2 != half:
            continue
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                        if 20 <= len(sentence) <= 300:
                            out.append(sentence)
    return out


def write_samples(path: str, n: int, seed: int = 0, prose: list[str] | None = None) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            messages = [{"role": "system", "content": SYSTEM}]
            for _ in range(1 if rng.random() < 0.8 else 2):
                messages += [{"role": "user", "content": text(rng, 5, 40, prose)},
                             {"role": "assistant", "content": text(rng, 10, 120, prose)}]
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


def make_tokenizer(kind: str, tok_dir: str) -> list[str] | None:
    """Writes the tokenizer; returns the sentences the samples are drawn from (None: the word list)."""
    from mindspeed_lora.tiny import build_tokenizer

    if kind == "tiny":
        build_tokenizer(tok_dir)
        return None
    # "prose": a 32k-vocabulary byte-level BPE (Qwen's special tokens) trained on held-out English prose plus
    # Chinese text, so tokens per word are those of a real tokenizer, not of the 512-token test tokenizer
    rng = random.Random(1)
    zh = ["".join(rng.choice(WORDS_ZH) for _ in range(rng.randint(5, 40))) for _ in range(20_000)]
    build_tokenizer(tok_dir, vocab_size=32_000, texts=prose_sentences(0) + zh)
    return prose_sentences(1)


def run_ours(data: str, tok_dir: str, prefix: str, workers: int) -> dict:
    from mindspeed_lora.data.preprocess import PreprocessConfig, run_preprocess

    cfg = PreprocessConfig(input=data, output_prefix=prefix, handler_name="OpenAIInstructionHandler",
                           tokenizer_name_or_path=tok_dir, prompt_type="chatml", workers=workers, progress=False)
    return run_preprocess(cfg)


def run_baseline(data: str, tok_dir: str, cache_dir: str, workers: int):
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.chat_template = CHAT_TEMPLATE

    def encode(example):
        r = tok.apply_chat_template(example["messages"], tokenize=True, return_dict=True,
                                    return_assistant_tokens_mask=True)
        ids = r["input_ids"]
        return {"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, r["assistant_masks"])],
                "attention_mask": [1] * len(ids)}

    ds = datasets.load_dataset("json", data_files=data, split="train", cache_dir=cache_dir)
    return ds.map(encode, num_proc=workers, remove_columns=ds.column_names)


def cpu_seconds() -> float:
    """This process and its waited-for children (pool workers are joined before a run returns)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def check_same_work(ours_prefix: str, baseline, n: int = 200) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for key in ("input_ids", "labels"):
        ds = IndexedDataset(f"{ours_prefix}_packed_{key}_document")
        for i in range(n):
            if ds[i].tolist() != baseline[i][key]:
                raise SystemExit(f"sample {i} {key}: ours and the baseline differ; the comparison would be unfair")


def throughput(args) -> dict:
    import datasets
    import megatron.core.datasets.indexed_dataset  # noqa: F401  (imports are not part of the timing)
    import transformers  # noqa: F401

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = os.path.join(tmp, "tok")
        prose = make_tokenizer(args.tokenizer, tok_dir)
        transformers.AutoTokenizer.from_pretrained(tok_dir)  # transformers' lazy import scan: not timed either
        data = os.path.join(tmp, "data.jsonl")
        write_samples(data, args.samples, prose=prose)
        rows = []
        for r in range(args.repeat):
            load = os.getloadavg()[0]
            c0, t0 = cpu_seconds(), time.perf_counter()
            summary = run_ours(data, tok_dir, os.path.join(tmp, f"ours{r}", "ds"), args.workers)
            ours = (args.samples / (time.perf_counter() - t0), (cpu_seconds() - c0) / args.samples * 1e6)
            c0, t0 = cpu_seconds(), time.perf_counter()
            baseline = run_baseline(data, tok_dir, os.path.join(tmp, f"cache{r}"), args.workers)
            base = (args.samples / (time.perf_counter() - t0), (cpu_seconds() - c0) / args.samples * 1e6)
            check_same_work(os.path.join(tmp, f"ours{r}", "ds"), baseline)
            rows.append((ours, base))
            print(f"run {r} (load average {load:.1f}): ours {ours[0]:.0f} samples/s, {ours[1]:.0f} CPU-us/sample; "
                  f"HF datasets.map + apply_chat_template {base[0]:.0f} samples/s, {base[1]:.0f} CPU-us/sample; "
                  f"wall ratio {ours[0] / base[0]:.2f}x, CPU ratio {base[1] / ours[1]:.2f}x", flush=True)
        tokens = summary["tokens"] / args.samples

    def median(values):
        return sorted(values)[len(values) // 2]

    ours_wall, base_wall = median([o[0] for o, _ in rows]), median([b[0] for _, b in rows])
    ours_cpu, base_cpu = median([o[1] for o, _ in rows]), median([b[1] for _, b in rows])
    return {"samples": args.samples, "workers": args.workers, "tokens_per_sample": round(tokens, 1),
            "ours_samples_per_s": round(ours_wall), "baseline_samples_per_s": round(base_wall),
            "wall_ratio": round(median([o[0] / b[0] for o, b in rows]), 2),
            "ours_cpu_us_per_sample": round(ours_cpu), "baseline_cpu_us_per_sample": round(base_cpu),
            "cpu_ratio": round(median([b[1] / o[1] for o, b in rows]), 2)}


def _children_peak_rss(stop: threading.Event, peak: dict) -> None:
    """Peak RSS (VmHWM) of each child process, sampled from /proc until ``stop``."""
    me = os.getpid()
    while not stop.wait(0.2):
        for task in os.listdir(f"/proc/{me}/task"):
            try:
                with open(f"/proc/{me}/task/{task}/children") as f:
                    pids = f.read().split()
            except OSError:
                continue
            for pid in pids:
                try:
                    with open(f"/proc/{pid}/status") as f:
                        hwm = next(int(x.split()[1]) for x in f if x.startswith("VmHWM:"))
                except (OSError, StopIteration):
                    continue
                peak[pid] = max(peak.get(pid, 0), hwm)


def rss_child(data: str, tok_dir: str, prefix: str, workers: int) -> None:
    """Run in a fresh process; prints peak RSS of this process and of its largest worker."""
    stop, peak = threading.Event(), {}
    sampler = threading.Thread(target=_children_peak_rss, args=(stop, peak), daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    summary = run_ours(data, tok_dir, prefix, workers)
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    print(json.dumps({"samples": summary["samples_written"], "seconds": round(seconds, 1),
                      "main_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                      "worker_peak_rss_mib": max(peak.values(), default=0) // 1024}))


def memory(args) -> list[dict]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = os.path.join(tmp, "tok")
        prose = make_tokenizer(args.tokenizer, tok_dir)
        for n in args.rss_samples:
            data = os.path.join(tmp, f"data{n}.jsonl")
            write_samples(data, n, seed=1, prose=prose)
            p = subprocess.run([sys.executable, __file__, "--rss-child", data, tok_dir, os.path.join(tmp, f"m{n}/ds"),
                                str(args.workers)], capture_output=True, text=True, env=dict(os.environ,
                                                                                          PYTHONWARNINGS="ignore"))
            if p.returncode != 0:
                raise SystemExit(p.stderr)
            row = json.loads(p.stdout.strip().splitlines()[-1])
            row["input_mib"] = round(os.path.getsize(data) / 2**20)
            out.append(row)
            print(f"{n} samples ({row['input_mib']} MiB of JSONL, {row['seconds']} s): peak RSS main "
                  f"{row['main_peak_rss_mib']} MiB, largest worker {row['worker_peak_rss_mib']} MiB", flush=True)
            os.remove(data)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=50_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3, help="throughput runs; medians are reported")
    p.add_argument("--rss-samples", type=int, nargs="*", default=[50_000, 500_000])
    p.add_argument("--tokenizer", choices=["tiny", "prose"], default="tiny",
                   help="tiny: the 512-token test tokenizer on a 30-word list (~2.5 tokens a word); prose: a "
                        "32k-vocabulary BPE trained on held-out English prose, samples drawn from other prose")
    p.add_argument("--rss-child", nargs=4, metavar=("DATA", "TOKENIZER", "PREFIX", "WORKERS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child:
        data, tok_dir, prefix, workers = args.rss_child
        rss_child(data, tok_dir, prefix, int(workers))
        return
    result = {"throughput": throughput(args), "memory": memory(args)}
    t = result["throughput"]
    print(f"\nmedians of {args.repeat} runs at {args.workers} workers, {t['tokens_per_sample']} tokens per sample: "
          f"ours {t['ours_samples_per_s']} samples/s vs baseline {t['baseline_samples_per_s']} samples/s "
          f"(wall ratio {t['wall_ratio']}x); CPU per sample {t['ours_cpu_us_per_sample']} us vs "
          f"{t['baseline_cpu_us_per_sample']} us (CPU ratio {t['cpu_ratio']}x); target >= 3x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
