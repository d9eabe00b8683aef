"""Forward passes of a megatron GPTModel for generation: prefill and decode over a static KV cache, or recompute.

``InferenceEngine`` runs the model's own modules (embedding -> decoder -> output layer) so that it can pass the
rotary embedding of the cache slots being written and compute logits for the last position only. The model
must be built with ``kv_cache_spec_hook`` (``build_inference_model`` does this). Logits come back gathered over
the tensor-parallel group, in fp32, identical on every TP rank.

A ``Decoder`` is one generation's state: ``prefill(ids, valid)`` then ``decode(tokens)`` per new token, both
returning next-token logits [b, vocab]. ``CachedDecoder`` keeps keys/values in a ``StaticKVCache``;
``RecomputeDecoder`` re-runs the whole sequence each step (``--no-use-kv-cache``; the cache's reference).
On CUDA, ``CachedDecoder`` captures its decode step in a CUDA graph: decode at batch 1 is bound by kernel
launches, and a replayed graph launches them all at once.
"""
from __future__ import annotations

import sys

import torch

from mindspeed_lora.inference.kv_cache import AttentionStep, StaticKVCache, cache_layers

CACHE_GRANULE = 64
"""KV caches are sized in multiples of this many slots, so that prompts of similar length share one cache."""


def attention_mask(valid: torch.Tensor, query_slots: torch.Tensor, key_slots: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive mask [b, 1, q, k]: 0 where the query at slot i sees the key at slot j (j <= i and slot j holds a
    real token), -inf elsewhere. Additive rather than bool: SDPA turns a bool mask into this anyway, slowly.

    valid: bool [b, k] (False on left padding); query_slots: long [q]; key_slots: long [k].
    A query at a pad slot also sees itself, so that no softmax row is empty (an empty row gives NaN, and NaN
    values times a zero weight still poison the real rows).
    """
    causal = key_slots[None, :] <= query_slots[:, None]  # [q, k]
    own = key_slots[None, :] == query_slots[:, None]
    allowed = (valid[:, None, None, :] & causal[None, None]) | own[None, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


class InferenceEngine:
    """A GPTModel chunk holding the whole model (PP=1) on this TP rank, in eval mode, driven for generation."""

    def __init__(self, model, max_position_embeddings: int, use_cuda_graph: bool = False,
                 sliding_window: int | None = None):
        cache_layers(model)  # fail early if the spec hook was not applied
        if not (model.pre_process and model.post_process):
            raise RuntimeError("inference needs the whole model on each rank (pipeline parallel size 1)")
        self.model = model.eval()
        self.max_positions = max_position_embeddings
        self.limit = f"the model's max_position_embeddings ({max_position_embeddings})"
        if sliding_window is not None and sliding_window < max_position_embeddings:
            # beyond the window the layers would need windowed attention, which is not implemented
            self.max_positions = sliding_window
            self.limit = f"the model's sliding attention window ({sliding_window}; windows are not implemented here)"
        self.use_cuda_graph = use_cuda_graph
        self._rope: torch.Tensor | None = None
        self._cached: CachedDecoder | None = None
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    def rope(self, length: int) -> torch.Tensor:
        """Rotary frequencies [length, 1, 1, dim] for slots 0..length-1 (a prefix of one cached table)."""
        if self._rope is None or self._rope.shape[0] < length:
            size = max(length, 256 if self._rope is None else 2 * self._rope.shape[0])
            self._rope = self.model.rotary_pos_emb.get_emb(size).to(self.device)
        return self._rope[:length]

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, rope: torch.Tensor, last_only: bool) -> torch.Tensor:
        """ids [b, s] -> fp32 logits [b, s or 1, vocab] (gathered over TP)."""
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        model = self.model
        hidden = model.embedding(input_ids=ids, position_ids=None)  # [s, b, h]
        hidden = model.decoder(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope)
        if last_only:
            hidden = hidden[-1:]
        weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
        logits, _ = model.output_layer(hidden, weight=weight)
        logits = gather_from_tensor_model_parallel_region(logits)
        return logits.transpose(0, 1).float()

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, valid: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits of a (left-padded) batch without a cache: [b, s or 1, vocab]."""
        layers = cache_layers(self.model)
        if valid is None:
            valid = torch.ones_like(ids, dtype=torch.bool)
        slots = torch.arange(ids.shape[1], device=self.device)
        step = AttentionStep()
        step.set(attention_mask(valid.to(self.device), slots, slots, self.dtype), None)
        previous = [layer.step for layer in layers]  # an open decoder's step is restored afterwards
        for layer in layers:
            layer.step = step
        try:
            return self.forward(ids.to(self.device), self.rope(ids.shape[1]), last_only)
        finally:
            for layer, prev in zip(layers, previous):
                layer.step = prev

    def decoder(self, batch: int, max_len: int, use_kv_cache: bool = True):
        if max_len > self.max_positions:
            from mindspeed_lora.errors import UserError

            raise UserError(f"prompt + new tokens = {max_len} tokens exceeds {self.limit}; shorten the prompt or "
                            "lower --max-new-tokens")
        if not use_kv_cache:
            return RecomputeDecoder(self, batch, max_len)
        # Reuse the last cache (and its captured graph) when it fits: slots past the sequence stay masked.
        max_len = min(-(-max_len // CACHE_GRANULE) * CACHE_GRANULE, self.max_positions)
        cached = self._cached
        if cached is None or cached.batch != batch or cached.max_len != max_len:
            if cached is not None:
                cached.release()
            cached = self._cached = CachedDecoder(self, batch, max_len)
        cached.reset()
        return cached

    def release(self) -> None:
        """Free the KV cache (and graph) kept for reuse."""
        if self._cached is not None:
            self._cached.release()
            self._cached = None


class RecomputeDecoder:
    """Generation without a cache: every step runs the whole sequence so far."""

    def __init__(self, engine: InferenceEngine, batch: int, max_len: int):
        self.engine = engine
        self.ids: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None

    def prefill(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        self.ids, self.valid = ids.to(self.engine.device), valid.to(self.engine.device)
        return self.engine.logits(self.ids, self.valid, last_only=True)[:, -1]

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.engine.device)[:, None]
        self.ids = torch.cat([self.ids, tokens], dim=1)
        self.valid = torch.cat([self.valid, torch.ones_like(tokens, dtype=torch.bool)], dim=1)
        return self.engine.logits(self.ids, self.valid, last_only=True)[:, -1]

    def reorder(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.engine.device)
        self.ids, self.valid = self.ids.index_select(0, rows), self.valid.index_select(0, rows)

    def close(self) -> None:
        pass


class CachedDecoder:
    """Generation over a static KV cache of ``max_len`` slots; the decode step has fixed shapes."""

    def __init__(self, engine: InferenceEngine, batch: int, max_len: int):
        self.engine = engine
        self.batch, self.max_len = batch, max_len
        dev = engine.device
        self.cache = StaticKVCache(engine.model, batch, max_len, engine.dtype, dev)
        self.step = AttentionStep()
        self.cache.attach(self.step)
        self.key_slots = torch.arange(max_len, device=dev)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=dev)
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)  # where the next token goes
        self.rope_table = engine.rope(max_len)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=dev)  # the decode step's input
        self.graph = None
        self.graph_logits: torch.Tensor | None = None

    def reset(self) -> None:
        self.cache.attach(self.step)
        self.valid.zero_()
        self.slot.zero_()

    def prefill(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        s = ids.shape[1]
        self.valid[:, :s] = valid.to(self.valid.device)
        slots = self.key_slots[:s]
        self.step.set(attention_mask(self.valid, slots, self.key_slots, self.engine.dtype), slots)
        logits = self.engine.forward(ids.to(self.engine.device), self.rope_table[:s], last_only=True)
        self.slot.fill_(s)
        return logits[:, -1]

    def _decode_body(self) -> torch.Tensor:
        self.valid.index_fill_(1, self.slot, True)
        self.step.set(attention_mask(self.valid, self.slot, self.key_slots, self.engine.dtype), self.slot)
        return self.engine.forward(self.tokens, self.rope_table.index_select(0, self.slot), last_only=True)[:, -1]

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens.view(-1, 1))
        if self.engine.use_cuda_graph and self.engine.device.type == "cuda" and self.graph is None:
            try:
                self._capture()
            except Exception as e:  # a module that cannot be captured: decode eagerly, same results, slower
                self.graph = None
                self.engine.use_cuda_graph = False
                print(f"warning: CUDA graph capture of the decode step failed ({e!r}); decoding without graphs",
                      file=sys.stderr, flush=True)
        if self.graph is not None:
            self.graph.replay()
            logits = self.graph_logits.clone()
        else:
            logits = self._decode_body()
        self.slot.add_(1)
        return logits

    @torch.no_grad()
    def _capture(self) -> None:
        """Record one decode step as a CUDA graph; its inputs (tokens, slot, valid, cache) are static buffers.

        The warm-up runs on a side stream as CUDA requires; it writes the cache at the current slot with the
        current tokens, which the replay right after rewrites with the same values.
        """
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._decode_body()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.graph_logits = self._decode_body()
        self.graph = graph

    def reorder(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.engine.device)
        self.cache.reorder(rows)
        self.valid.copy_(self.valid.index_select(0, rows))

    def close(self) -> None:
        """End of one generation: detach the cache from the layers (kept for reuse by the engine)."""
        self.cache.attach(None)

    def release(self) -> None:
        self.graph = None
        self.cache.release()
