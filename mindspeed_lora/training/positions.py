"""Rotary embeddings at per-token positions, so that positions restart at every packed sample.

megatron-core's GPTModel computes rotary frequencies for positions 0..s-1 of the row and ignores
``position_ids`` (outside THD packing, which its local attention does not support). For packed rows the
trainer sets the micro-batch's ``position_ids`` here before the forward; the frequencies then have shape
[s, b, 1, d], which megatron's rotary application broadcasts over heads exactly as it does [s, 1, 1, d].
"""
from __future__ import annotations

import torch


class PositionedRotaryEmbedding(torch.nn.Module):
    """Wraps a GPTModel's ``RotaryEmbedding``; with ``position_ids`` unset it is the wrapped module."""

    def __init__(self, rotary):
        super().__init__()
        if getattr(rotary, "rotary_interleaved", False):
            raise ValueError("interleaved rotary embeddings are not supported with packed positions")
        self.rotary = rotary
        self.position_ids: torch.Tensor | None = None
        """[b, s] positions of the next forward, or None for 0..s-1."""

    @property
    def inv_freq(self) -> torch.Tensor:
        return self.rotary.inv_freq

    def get_rotary_seq_len(self, *args, **kwargs) -> int:
        return self.rotary.get_rotary_seq_len(*args, **kwargs)

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None):
        if self.position_ids is None:
            return self.rotary(max_seq_len, offset, packed_seq, cp_group)
        # on the positions' device: megatron keeps inv_freq on the CPU until its own first forward
        inv_freq = self.inv_freq.to(self.position_ids.device)
        pos = self.position_ids.t().to(inv_freq.dtype)  # [s, b]
        if pos.shape[0] != max_seq_len:
            raise ValueError(f"position_ids cover {pos.shape[0]} tokens, the model runs {max_seq_len}")
        freqs = pos.unsqueeze(-1) * inv_freq  # [s, b, d/2]
        return torch.cat((freqs, freqs), dim=-1).unsqueeze(2)  # [s, b, 1, d]


def install(model) -> PositionedRotaryEmbedding | None:
    """Give a GPTModel chunk positioned rotary embeddings; returns the handle (None without rope)."""
    rotary = getattr(model, "rotary_pos_emb", None)
    if rotary is None:
        return None
    if isinstance(rotary, PositionedRotaryEmbedding):
        return rotary
    wrapped = PositionedRotaryEmbedding(rotary)
    model.rotary_pos_emb = wrapped
    return wrapped
