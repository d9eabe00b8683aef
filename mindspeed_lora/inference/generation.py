"""Token generation over an ``InferenceEngine``: greedy, sampling and beam search, with stop tokens.

Semantics follow HF ``generate`` so that its output is our oracle: the prompt batch is left-padded, a row stops
after emitting a stop token (which is part of its output), ``max_new_tokens`` bounds the output, and beam search
keeps HF's scoring (sum of log-probs / generated_length ** length_penalty) and its early-stop heuristic.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from mindspeed_lora.errors import UserError
from mindspeed_lora.inference.engine import InferenceEngine
from mindspeed_lora.inference.sampling import choose_next


@dataclass
class GenerationConfig:
    """How to generate; built from the inference flags (``mindspeed_lora.arguments.inference``)."""

    max_new_tokens: int = 128
    """Upper bound on generated tokens per prompt (the stop token included)."""
    do_sample: bool = False
    """Sample from the (warped) distribution instead of taking the argmax."""
    temperature: float = 1.0
    top_k: int = 0
    """Keep the k most likely tokens when sampling; 0 keeps all."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 keeps all."""
    num_beams: int = 1
    """More than 1 runs beam search (deterministic unless do_sample)."""
    length_penalty: float = 1.0
    """Beam search: finished beams score sum(log p) / length ** length_penalty."""
    use_kv_cache: bool = True
    stop_token_ids: tuple[int, ...] = ()
    """A row ends after emitting one of these (eos and single-token stop words)."""
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    """Multi-token stop words: a row ends when its output ends with one of these."""
    pad_token_id: int = 0
    """Fills left padding and the rows that already stopped; never attended to."""
    seed: int = 1234
    """Seed of the sampling generator (the same on every TP rank)."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens={self.max_new_tokens}: expected a positive number")
        if self.do_sample and self.temperature <= 0:
            raise UserError(f"--temperature={self.temperature}: expected > 0 when sampling")
        if self.top_k < 0:
            raise UserError(f"--top-k={self.top_k}: expected >= 0 (0 keeps every token)")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"--top-p={self.top_p}: expected a value in (0, 1]")
        if self.num_beams < 1:
            raise UserError(f"--num-beams={self.num_beams}: expected >= 1")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        self.stop_sequences = tuple(tuple(int(t) for t in s) for s in self.stop_sequences if s)


@dataclass
class Generated:
    """One prompt's output."""

    tokens: list[int]
    finish_reason: str  # "stop" (a stop token/sequence ended it) or "length" (max_new_tokens)
    stop: list[int] = field(default_factory=list)
    """The trailing tokens that matched a stop word (also at the end of ``tokens``)."""

    @property
    def content_tokens(self) -> list[int]:
        return self.tokens[: len(self.tokens) - len(self.stop)]


def _stop_match(tokens: list[int], cfg: GenerationConfig) -> list[int] | None:
    if tokens and tokens[-1] in cfg.stop_token_ids:
        return tokens[-1:]
    for seq in cfg.stop_sequences:
        if len(tokens) >= len(seq) and tuple(tokens[-len(seq):]) == seq:
            return list(seq)
    return None


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [b, s] and valid [b, s] with every prompt right-aligned."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt must have at least one token")
    s = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), s), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), s), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, s - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[i, s - len(p):] = True
    return ids, valid


def sampling_generator(engine: InferenceEngine, cfg: GenerationConfig) -> torch.Generator:
    """A generator seeded with ``cfg.seed`` on the engine's device; pass one to several ``generate`` calls to
    continue its stream (a chat's replies), or let each call start from the seed."""
    return torch.Generator(device=engine.device).manual_seed(cfg.seed)


def generate(engine: InferenceEngine, prompts: list[list[int]], cfg: GenerationConfig,
             on_token: Callable[[int, list[int]], None] | None = None,
             generator: torch.Generator | None = None) -> list[Generated]:
    """Generate for a batch of token-id prompts; ``on_token(row, tokens_so_far)`` after each new token."""
    if cfg.do_sample and generator is None:
        generator = sampling_generator(engine, cfg)
    if cfg.num_beams > 1:
        return beam_search(engine, prompts, cfg, generator)
    ids, valid = left_pad(prompts, cfg.pad_token_id)
    b = ids.shape[0]
    decoder = engine.decoder(b, ids.shape[1] + cfg.max_new_tokens, cfg.use_kv_cache)
    outputs: list[list[int]] = [[] for _ in range(b)]
    stops: list[list[int] | None] = [None] * b
    try:
        logits = decoder.prefill(ids, valid)
        for step in range(cfg.max_new_tokens):
            nxt = choose_next(logits, cfg.do_sample, generator, cfg.temperature, cfg.top_k, cfg.top_p)
            done = torch.tensor([s is not None for s in stops], device=nxt.device)
            nxt = torch.where(done, torch.full_like(nxt, cfg.pad_token_id), nxt)
            for row, token in enumerate(nxt.tolist()):
                if stops[row] is not None:
                    continue
                outputs[row].append(token)
                stops[row] = _stop_match(outputs[row], cfg)
                if on_token is not None:
                    on_token(row, outputs[row])
            if all(s is not None for s in stops) or step == cfg.max_new_tokens - 1:
                break
            logits = decoder.decode(nxt)
    finally:
        decoder.close()
    return [Generated(out, "stop" if s is not None else "length", s or []) for out, s in zip(outputs, stops)]


def beam_search(engine: InferenceEngine, prompts: list[list[int]], cfg: GenerationConfig,
                generator: torch.Generator | None = None) -> list[Generated]:
    """Beam search with HF's semantics (early_stopping=False): per prompt, the best finished hypothesis.

    Each step takes the top 2·k (more with several stop tokens) continuations of all k beams by accumulated
    log-prob; candidates ending in a stop token (among the first k) become finished hypotheses scored
    sum_logprob / generated_length ** length_penalty; the best k unfinished ones run on. A prompt is done when
    its worst kept hypothesis beats what its best running beam could still reach at the current length.
    Beams end at stop tokens only (``cfg.stop_sequences``, multi-token stop words, are not applied here).
    """
    k = cfg.num_beams
    ids, valid = left_pad(prompts, cfg.pad_token_id)
    b, prompt_len = ids.shape
    ids, valid = ids.repeat_interleave(k, 0), valid.repeat_interleave(k, 0)
    decoder = engine.decoder(b * k, prompt_len + cfg.max_new_tokens, cfg.use_kv_cache)
    n_stop = len(cfg.stop_token_ids)
    keep = max(2, 1 + n_stop) * k
    if cfg.do_sample and generator is None:
        generator = sampling_generator(engine, cfg)
    neg = -1.0e9
    dev = engine.device
    stop_ids = torch.tensor(cfg.stop_token_ids, dtype=torch.long, device=dev)
    running = torch.full((b, k, cfg.max_new_tokens), cfg.pad_token_id, dtype=torch.long, device=dev)
    running_scores = torch.zeros(b, k, device=dev)
    running_scores[:, 1:] = neg  # all beams start equal: expand only the first at step one
    finished = running.clone()
    finished_len = torch.zeros(b, k, dtype=torch.long, device=dev)
    finished_scores = torch.full((b, k), neg, device=dev)
    finished_ok = torch.zeros(b, k, dtype=torch.bool, device=dev)
    improvable = torch.ones(b, 1, dtype=torch.bool, device=dev)
    in_top_k = (torch.arange(keep, device=dev) < k)[None, :]
    try:
        logits = decoder.prefill(ids, valid)
        for step in range(cfg.max_new_tokens):
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            vocab = logprobs.shape[-1]
            total = (logprobs.view(b, k, vocab) + running_scores[:, :, None]).view(b, k * vocab)
            if cfg.do_sample:
                cand = torch.multinomial(total.softmax(-1), keep, generator=generator)
                cand_scores = total.gather(1, cand)
            else:
                cand_scores, cand = torch.topk(total, keep, dim=-1)
            src_beam, token = cand // vocab, cand % vocab
            seqs = running.gather(1, src_beam[:, :, None].expand(-1, -1, running.shape[-1])).clone()
            seqs[:, :, step] = token
            hits = torch.isin(token, stop_ids) | (step == cfg.max_new_tokens - 1)
            # finished hypotheses: only among the first k candidates, and only while the prompt can improve
            fin_scores = cand_scores / float(step + 1) ** cfg.length_penalty
            fin_scores = fin_scores + (~(hits & in_top_k & improvable)).float() * neg
            merged_scores = torch.cat([finished_scores, fin_scores], dim=1)
            best = torch.topk(merged_scores, k, dim=1).indices
            finished = torch.cat([finished, seqs], 1).gather(1, best[:, :, None].expand(-1, -1, seqs.shape[-1]))
            finished_len = torch.cat([finished_len, torch.full_like(token, step + 1)], 1).gather(1, best)
            finished_ok = torch.cat([finished_ok, hits & in_top_k & improvable], 1).gather(1, best)
            finished_scores = merged_scores.gather(1, best)
            # running beams: the best k candidates that did not stop
            live_scores = cand_scores + hits.float() * neg
            top = torch.topk(live_scores, k, dim=1).indices
            running = seqs.gather(1, top[:, :, None].expand(-1, -1, seqs.shape[-1]))
            running_scores = live_scores.gather(1, top)
            rows = (src_beam.gather(1, top) + torch.arange(b, device=dev)[:, None] * k).view(-1)
            # HF's heuristic with early_stopping=False: the best running beam scored at the current length
            best_running = running_scores[:, :1] / float(step + 1) ** cfg.length_penalty
            worst_kept = torch.where(finished_ok, finished_scores.min(dim=1, keepdim=True).values,
                                     torch.full_like(finished_scores, neg))
            improvable = improvable & (best_running > worst_kept).any(dim=1, keepdim=True)
            if step == cfg.max_new_tokens - 1 or not bool(improvable.any()) or bool(hits.all()):
                break
            decoder.reorder(rows)
            logits = decoder.decode(running[:, :, step].reshape(-1))
    finally:
        decoder.close()
    out = []
    for i in range(b):
        n = int(finished_len[i, 0])
        tokens = finished[i, 0, :n].tolist()
        stop = _stop_match(tokens, cfg)
        out.append(Generated(tokens, "stop" if stop else "length", stop or []))
    return out
