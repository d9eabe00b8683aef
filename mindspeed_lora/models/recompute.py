"""``--recompute-method split``: full recompute that does not re-run the layers' output projections.

megatron's full recompute checkpoints whole layers and re-runs each layer's forward in backward. Backward
needs the activations *inside* the layer, but not the outputs of ``linear_proj`` and ``linear_fc2``: those
only feed residual adds. Here each layer is two checkpoints (megatron's reentrant ``CheckpointFunction``,
which also restores the CPU, device and tensor-parallel-tracker random states): the attention half (input
norm ... linear_proj + residual) and the MLP half (pre-MLP norm ... linear_fc2 + residual). Each half's
output is the next one's saved input, so its recomputed *value* is never used, only its backward graph.
A LoRA ``linear_proj`` / ``linear_fc2`` on the TP=1 fused path (``recompute_skips_output`` in
``mindspeed_lora.lora.layers``) therefore computes in the recomputation only what its backward saves (x and
x·Aᵀ) and skips the frozen base GEMM and the adapter's output GEMM: a third of a layer's matmul parameters
in Qwen3 and Llama shapes run once instead of twice. Cost: two hidden-size activations kept per layer
instead of one. Under tensor parallelism (no fused path) both halves are recomputed in full.

Reentrant rather than ``torch.utils.checkpoint(use_reentrant=False)``: the latter's per-tensor pack/unpack
hooks made the host's recomputation ~1.5x slower than the forward on the H100, and this step is host-bound.
"""
from __future__ import annotations

import functools
import threading

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.transformer_layer import TransformerLayer

_STATE = threading.local()


def recomputation_discards_outputs() -> bool:
    """True while a split half-layer is being recomputed: its output value is discarded (see the docstring)."""
    return getattr(_STATE, "depth", 0) > 0


def _recomputed(function):
    """``function`` as a checkpoint runs it: its first run (no grad) as is, its recomputation flagged."""

    @functools.wraps(function)
    def run(hidden_states):
        if not torch.is_grad_enabled():
            return function(hidden_states)
        _STATE.depth = getattr(_STATE, "depth", 0) + 1
        try:
            return function(hidden_states)
        finally:
            _STATE.depth -= 1

    return run


class SplitRecomputeTransformerLayer(TransformerLayer):
    """megatron's TransformerLayer, checkpointed per half while training (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name, owner in (("linear_proj", self.self_attention), ("linear_fc2", self.mlp)):
            linear = getattr(owner, name, None)
            if linear is not None and hasattr(linear, "recompute_skips_output"):
                linear.recompute_skips_output = True

    def forward(self, hidden_states, *args, **kwargs):
        kwargs.pop("dynamic_inference_decode_only", None)
        if args or not (self.training and torch.is_grad_enabled()) or kwargs.get("inference_context") is not None:
            return super().forward(hidden_states, *args, **kwargs)
        attention = _recomputed(functools.partial(self._forward_attention, **kwargs))
        hidden_states, context = tensor_parallel.checkpoint(attention, False, hidden_states)
        mlp = _recomputed(functools.partial(self._forward_mlp, padding_mask=kwargs.get("padding_mask")))
        output = tensor_parallel.checkpoint(mlp, False, hidden_states)
        return output, context
