"""What a run reports: model FLOPs, the Megatron-style log line, TensorBoard scalars, the loss-curve PNG."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from mindspeed_lora.models.arch import ModelArch


def matmul_params(arch: ModelArch) -> int:
    """Weights that take part in a matmul per token: attention, MLP and the output layer (not the lookup)."""
    h, heads, groups, d = arch.hidden_size, arch.num_attention_heads, arch.num_query_groups, arch.kv_channels
    attn = h * (heads + 2 * groups) * d + heads * d * h
    mlp = 3 * h * arch.ffn_hidden_size
    return arch.num_layers * (attn + mlp) + arch.vocab_size * h


def train_flops(arch: ModelArch, segment_lengths: list[int], lora: bool) -> float:
    """Model FLOPs of one training pass over segments of these lengths (recomputation not counted).

    A matmul weight costs 2 FLOPs per token forward and 4 backward (input and weight grads): 6N per token for
    full fine-tuning; a frozen base skips the weight grads, 4N (LoRA's own matmuls are negligible).
    Causal attention forward costs 2 * layers * heads * head_dim * l^2 per segment of l tokens (QK^T and PV,
    half the square); backward twice that.
    """
    n = matmul_params(arch)
    per_token = (4 if lora else 6) * n
    tokens = sum(segment_lengths)
    attn_fwd = sum(2.0 * arch.num_layers * arch.num_attention_heads * arch.kv_channels * n * n
                   for n in segment_lengths)
    return per_token * tokens + 3 * attn_fwd


@dataclass
class IntervalStats:
    """Sums over the iterations since the last log line."""

    iterations: int = 0
    seconds: float = 0.0
    tokens: int = 0
    flops: float = 0.0
    loss_sum: float = 0.0
    skipped: int = 0
    started: float = field(default_factory=time.time)

    def add(self, seconds: float, tokens: int, flops: float, loss: float, skipped: bool) -> None:
        self.iterations += 1
        self.seconds += seconds
        self.tokens += tokens
        self.flops += flops
        self.loss_sum += loss
        self.skipped += int(skipped)


def format_log_line(iteration: int, train_iters: int, consumed: int, stats: IntervalStats, lr: float,
                    grad_norm: float | None, global_batch: int, world_size: int, memory: dict,
                    loss_scale: float | None) -> str:
    ms = 1000.0 * stats.seconds / max(stats.iterations, 1)
    loss = stats.loss_sum / max(stats.iterations, 1)
    tok_s = stats.tokens / max(stats.seconds, 1e-9)
    tflops = stats.flops / max(stats.seconds, 1e-9) / world_size / 1e12
    gib = 1024 ** 3
    parts = [
        f" [{time.strftime('%Y-%m-%d %H:%M:%S')}] iteration {iteration:8d}/{train_iters:8d}",
        f"consumed samples: {consumed:12d}",
        f"elapsed time per iteration (ms): {ms:.1f}",
        f"learning rate: {lr:.6E}",
        f"global batch size: {global_batch:5d}",
        f"lm loss: {loss:.6E}",
    ]
    if loss_scale is not None:
        parts.append(f"loss scale: {loss_scale:.1f}")
    parts += [
        f"grad norm: {grad_norm:.4f}" if grad_norm is not None else "grad norm: -",
        f"number of skipped iterations: {stats.skipped:3d}",
        f"tokens/s: {tok_s:.1f}",
        f"TFLOP/s per device: {tflops:.3f}",
        f"mem GiB alloc/peak/reserved: {memory.get('allocated', 0) / gib:.2f}/"
        f"{memory.get('max_allocated', 0) / gib:.2f}/{memory.get('reserved', 0) / gib:.2f}",
    ]
    return " | ".join(parts) + " |"


class TensorBoardLog:
    """Scalars under the names Megatron uses (lm loss, learning-rate, grad-norm, ...); a no-op without a dir."""

    def __init__(self, log_dir: str | None):
        self.writer = None
        if log_dir:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(log_dir, exist_ok=True)
            self.writer = SummaryWriter(log_dir=log_dir, max_queue=10)

    def scalars(self, iteration: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if v is not None:
                self.writer.add_scalar(k, v, iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def write_loss_curve(path: str, train: list[tuple[int, float]], valid: list[tuple[int, float]]) -> str:
    """Training (and validation) loss against iteration as a PNG, written atomically; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot([i for i, _ in train], [v for _, v in train], label="train loss", lw=1.2)
    if valid:
        ax.plot([i for i, _ in valid], [v for _, v in valid], "o-", label="validation loss", lw=1.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
