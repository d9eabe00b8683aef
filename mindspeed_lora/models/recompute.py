"""``--recompute-method split``: full recompute that does not re-run the layers' output projections.

megatron's full recompute checkpoints whole layers and re-runs each layer's forward in backward. Backward
needs the activations *inside* the layer, but not the outputs of ``linear_proj`` and ``linear_fc2``: those
only feed residual adds. Here each layer is two checkpoints, the attention half (input norm ... linear_proj
+ residual) and the MLP half (pre-MLP norm ... linear_fc2 + residual), under ``torch.utils.checkpoint``
without reentrance. Its recomputation stops as soon as the last tensor backward needs has been recomputed;
a LoRA ``linear_proj`` / ``linear_fc2`` saves its inputs before the frozen base GEMM runs (see
``recompute_stops_before_base`` in ``mindspeed_lora.lora.layers``), so those GEMMs (a third of a layer's
matmul parameters in Qwen3 and Llama shapes) run once instead of twice. Cost: two hidden-size activations
kept per layer instead of one.

Random state: torch restores the CPU and default device generators for the recomputation; megatron's
tensor-parallel RNG tracker (dropout under TP) is restored by ``_tracker_replay``.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch.utils.checkpoint import checkpoint


def _tracker_replay():
    """(forward context, recomputation context): the recomputation sees the tracker states of the forward."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    saved = tracker.get_states()

    @contextlib.contextmanager
    def replay():
        current = tracker.get_states()
        tracker.set_states(dict(saved))  # a fork inside writes into the dict it is given
        try:
            yield
        finally:
            tracker.set_states(current)

    return contextlib.nullcontext(), replay()


class SplitRecomputeTransformerLayer(TransformerLayer):
    """megatron's TransformerLayer, checkpointed per half while training (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name, owner in (("linear_proj", self.self_attention), ("linear_fc2", self.mlp)):
            linear = getattr(owner, name, None)
            if linear is not None and hasattr(linear, "recompute_stops_before_base"):
                linear.recompute_stops_before_base = True

    def forward(self, hidden_states, *args, **kwargs):
        kwargs.pop("dynamic_inference_decode_only", None)
        if args or not (self.training and torch.is_grad_enabled()) or kwargs.get("inference_context") is not None:
            return super().forward(hidden_states, *args, **kwargs)
        # hidden_states goes positionally: torch saves the device RNG state only of positional tensor inputs
        hidden_states, context = checkpoint(functools.partial(self._forward_attention, **kwargs), hidden_states,
                                            use_reentrant=False, context_fn=_tracker_replay)
        mlp = functools.partial(self._forward_mlp, padding_mask=kwargs.get("padding_mask"))
        output = checkpoint(mlp, hidden_states, use_reentrant=False, context_fn=_tracker_replay)
        return output, context
