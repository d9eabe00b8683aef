"""Tiny models and a tiny tokenizer, built locally from configs with random weights (tests, quickstart, bench).

Nothing is downloaded: the tokenizer is a byte-level BPE trained with ``tokenizers`` on a small built-in
corpus (English and Chinese), with Qwen-style special tokens; models are HF ``*ForCausalLM`` built from
configs and saved as safetensors.
"""
from __future__ import annotations

import os

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>",
                  "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello! I am an AI assistant. How can I help you today?",
    "Who are you? What is your name? Who made you?",
    "Give three tips for staying healthy: eat well, sleep enough and exercise.",
    "Translate the sentence into French. Summarize the following text.",
    "The capital of France is Paris. The answer is A. The answer is B. C. D.",
    "system user assistant question answer instruction input output",
    "1 + 1 = 2. 2 * 3 = 6. 10 - 4 = 6. Numbers: 0 1 2 3 4 5 6 7 8 9",
    "你好，我是一个人工智能助手。请问有什么可以帮你的？",
    "中国的首都是北京。今天天气很好。我们一起学习吧。",
    "def add(a, b):\n    return a + b\n",
]


def corpus() -> list[str]:
    return _CORPUS * 20


def build_tokenizer(out_dir: str, vocab_size: int = 512, texts: list[str] | None = None):
    """Train and save a byte-level BPE tokenizer with Qwen-style special tokens; returns the HF tokenizer.

    ``texts``: the training corpus (default: the bundled tiny corpus)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus() if texts is None else texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(out_dir)
    return hf


def tiny_hf_config(family: str, vocab_size: int = 512, **overrides):
    """A 2-layer, hidden-64 HF config of ``family`` (qwen3, llama3, qwen2, mistral) with GQA."""
    import transformers

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=2, pad_token_id=0,
    )
    if family == "qwen3":
        cfg = transformers.Qwen3Config(**{**common, "head_dim": 32, "rope_theta": 1000000.0, **overrides})
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**{**common, "rope_theta": 1000000.0, "tie_word_embeddings": True,
                                          **overrides})
    elif family == "llama3":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}
        cfg = transformers.LlamaConfig(**{**common, "rope_theta": 500000.0, "rope_scaling": rope, **overrides})
    elif family == "mistral":  # v0.3's layout: no sliding window, an explicit head_dim
        cfg = transformers.MistralConfig(**{**common, "head_dim": 32, "rope_theta": 1000000.0,
                                            "sliding_window": None, **overrides})
    else:
        raise ValueError(f"no tiny config for family {family!r}")
    return cfg


def build_hf_model(family: str, out_dir: str | None = None, seed: int = 0, dtype: str = "float32",
                   **overrides):
    """A tiny random HF causal LM (weights std ``initializer_range``, 0.02 unless overridden; norms randomised
    too); saved to ``out_dir`` if given."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = tiny_hf_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms and biases: random, so that a swapped mapping cannot pass
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.02 * torch.randn_like(p))
    model = model.to(getattr(torch, dtype)).eval()
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True)
    return model


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Build a tiny random HF model and a tiny tokenizer (no downloads).")
    p.add_argument("--family", default="qwen3", choices=["qwen3", "llama3", "qwen2"])
    p.add_argument("--out", required=True, help="output HF model directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--initializer-range", type=float, default=None,
                   help="std of the random weight matrices (default: transformers' 0.02)")
    a = p.parse_args(argv)
    overrides = {} if a.initializer_range is None else {"initializer_range": a.initializer_range}
    build_tokenizer(a.out)
    build_hf_model(a.family, a.out, seed=a.seed, dtype=a.dtype, **overrides)
    print(f"tiny {a.family} model and tokenizer written to {a.out}")


if __name__ == "__main__":
    main()
