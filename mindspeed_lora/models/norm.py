"""RMSNorm for megatron's layer spec, in HF's numerics, that works with sequence parallelism.

megatron-core's torch fallback (WrappedTorchNorm) refuses sequence parallelism; this one marks its weight
``sequence_parallel`` so megatron's finalize_model_grads all-reduces its grad over the TP group (each rank
sees only its slice of the sequence). Fused kernels replace it through the spec (mindspeed_lora.ops).
"""
from __future__ import annotations

import torch


class RMSNorm(torch.nn.Module):
    """y = weight * (x / sqrt(mean(x^2) + eps)), statistics in fp32, as HF Llama/Qwen compute it."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.config = config
        self.eps = eps
        device = torch.device("cpu") if config.use_cpu_initialization else None
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., hidden] -> same shape and dtype."""
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)
