"""NEFTune (``--neftune-noise-alpha``, LLaMA-Factory's ``neftune_noise_alpha``): uniform noise on the token
embeddings while training, of half-width alpha / sqrt(L·d) for a micro-batch row of L positions and hidden
size d, as HF's trainer adds it. Nothing changes in evaluation (the module is in eval mode) or in DPO's
reference pass.

Under sequence parallelism each tensor-parallel rank holds L/t positions of the row: the width uses the whole
L, and the noise is drawn from megatron's model-parallel RNG so that the ranks' slices get independent noise.
Without it every tensor-parallel rank holds the same embeddings and draws the same noise from the default
generator (which megatron keeps identical across tensor-parallel ranks, as its dropout needs).
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch


def noise_half_width(alpha: float, positions: int, hidden: int) -> float:
    return alpha / math.sqrt(positions * hidden)


class NEFTuneHook:
    """A forward hook for the embedding module (the output is [s, b, h], s sequence-sharded under SP)."""

    def __init__(self, alpha: float, sequence_parallel: bool, tp_size: int):
        self.alpha, self.sequence_parallel, self.tp_size = alpha, sequence_parallel, tp_size

    def __call__(self, module, inputs, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        positions = output.shape[0] * (self.tp_size if self.sequence_parallel else 1)
        width = noise_half_width(self.alpha, positions, output.shape[-1])
        if self.sequence_parallel and self.tp_size > 1:
            from megatron.core.tensor_parallel import get_cuda_rng_tracker

            rng = get_cuda_rng_tracker().fork()
        else:
            rng = nullcontext()
        with rng:
            noise = torch.empty_like(output).uniform_(-width, width)
        return output + noise


def install(model, alpha: float, sequence_parallel: bool, tp_size: int):
    """Hook the first stage's embedding; returns the hook handle (None on later stages or without alpha)."""
    embedding = getattr(model, "embedding", None)
    if not alpha or embedding is None:
        return None
    return embedding.register_forward_hook(NEFTuneHook(alpha, sequence_parallel, tp_size))
