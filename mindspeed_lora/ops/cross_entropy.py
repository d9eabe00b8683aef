"""Cross-entropy of the output layer fused with its matmul: per-token loss from hidden states and the output
weight, without the [tokens, vocab] fp32 logits ever existing whole; vocab-parallel aware.

``fused_linear_cross_entropy(hidden [s, b, h], weight [v/tp, h], labels [b, s]) -> loss [b, s]`` (fp32; 0 where
the label is ``ignore_index``). Labels are global vocab ids aligned with ``hidden`` (already shifted). With
tensor parallelism each rank holds rows ``[tp_rank * v/tp, (tp_rank + 1) * v/tp)`` of the weight (megatron's
vocab-parallel output layer); the max, the sum of exponentials and the target logit are reduced over the TP
group, so every rank returns the full loss.

- reference: full logits ``(hidden @ weight^T).float()``, gathered over TP, then ``F.cross_entropy``;
- cuda / npu: the chunked implementation below (plain torch, so its matmuls are the device's GEMMs): tokens in
  chunks of about ``CHUNK_ELEMENTS / (v/tp)``, each chunk's fp32 logits live only inside the loop.

Gradients (``_ChunkedLinearCE``): with p = softmax(logits) and y the one-hot label, dlogits = g * (p - y) for
the incoming per-token gradient g; dhidden = dlogits @ W, dW = dlogits^T @ hidden, chunk by chunk. When the
weight is frozen (LoRA) dhidden / g is computed in the forward pass, so backward is one multiply and the
logits are never recomputed; otherwise backward recomputes each chunk's logits from the saved log-sum-exp.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mindspeed_lora.ops.dispatch import select

CHUNK_ELEMENTS = 1 << 26  # fp32 logits per chunk: 256 MiB


def default_tp_group():
    """megatron's tensor-parallel group when it is initialised with more than one rank, else None."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    group = parallel_state.get_tensor_model_parallel_group()
    return group if group.size() > 1 else None


def _all_reduce(t: torch.Tensor, op, group) -> None:
    if group is not None:
        torch.distributed.all_reduce(t, op=op, group=group)


class _ChunkedLinearCE(torch.autograd.Function):
    """Per-token CE of x @ W^T over a vocab shard; see the module docstring for the algebra."""

    @staticmethod
    def forward(ctx, x, weight, labels, ignore_index, vocab_start, group, chunk):
        tokens, vocab = x.shape[0], weight.shape[0]
        valid = labels != ignore_index
        local = labels - vocab_start
        owned = valid & (local >= 0) & (local < vocab)
        local = torch.where(owned, local, torch.zeros_like(local))
        loss = torch.empty(tokens, dtype=torch.float32, device=x.device)
        lse = torch.empty(tokens, dtype=torch.float32, device=x.device)
        precompute = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        dx_unit = torch.empty_like(x) if precompute else None
        for start in range(0, tokens, chunk):
            rows = slice(start, min(tokens, start + chunk))
            logits = (x[rows] @ weight.t()).float()
            row_max = logits.max(dim=-1).values
            _all_reduce(row_max, torch.distributed.ReduceOp.MAX, group)
            logits.sub_(row_max[:, None])
            target = logits.gather(1, local[rows, None]).squeeze(1) * owned[rows]
            sum_exp = logits.exp_().sum(dim=-1)  # logits now hold exp(logit - max)
            _all_reduce(sum_exp, torch.distributed.ReduceOp.SUM, group)
            _all_reduce(target, torch.distributed.ReduceOp.SUM, group)
            log_sum = sum_exp.log()
            loss[rows] = log_sum - target
            lse[rows] = log_sum + row_max
            if precompute:
                probs = logits.div_(sum_exp[:, None])
                _subtract_one_hot(probs, local[rows], owned[rows])
                probs.mul_(valid[rows, None])
                dx_unit[rows] = probs.to(x.dtype) @ weight
        loss.masked_fill_(~valid, 0.0)
        ctx.precompute = precompute
        ctx.chunk = chunk
        if precompute:
            ctx.save_for_backward(dx_unit, valid)
        else:
            ctx.save_for_backward(x, weight, local, owned, valid, lse)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.precompute:
            dx_unit, valid = ctx.saved_tensors
            g = (grad_loss.float() * valid)[:, None]
            return (dx_unit * g).to(dx_unit.dtype), None, None, None, None, None, None
        x, weight, local, owned, valid, lse = ctx.saved_tensors
        g = grad_loss.float() * valid
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx = torch.empty_like(x) if need_x else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, x.shape[0], ctx.chunk):
            rows = slice(start, min(x.shape[0], start + ctx.chunk))
            probs = (x[rows] @ weight.t()).float().sub_(lse[rows, None]).exp_()
            _subtract_one_hot(probs, local[rows], owned[rows])
            dlogits = probs.mul_(g[rows, None]).to(x.dtype)
            if need_x:
                dx[rows] = dlogits @ weight
            if need_w:
                dw += (dlogits.t() @ x[rows]).float()
        return dx, None if dw is None else dw.to(weight.dtype), None, None, None, None, None


def _subtract_one_hot(probs: torch.Tensor, local: torch.Tensor, owned: torch.Tensor) -> None:
    probs.scatter_add_(1, local[:, None], -owned[:, None].to(probs.dtype))


def _chunked(x, weight, labels, ignore_index, vocab_start, group, chunk_size):
    chunk = chunk_size or max(1, CHUNK_ELEMENTS // weight.shape[0])
    return _ChunkedLinearCE.apply(x, weight, labels, ignore_index, vocab_start, group, chunk)


def _reference(x, weight, labels, ignore_index, vocab_start, group, chunk_size):
    logits = (x @ weight.t()).float()
    if group is not None:
        from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

        logits = gather_from_tensor_model_parallel_region(logits, group)
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")


_IMPLS = {"reference": _reference, "cuda": _chunked, "npu": _chunked}


def _same_device(device_type: str):
    def check(forced: bool, tensors: tuple) -> str | None:
        if forced:  # plain torch: runs wherever the tensors are
            return None
        off = {t.device.type for t in tensors} - {device_type}
        return f"tensors on {sorted(off)}" if off else None

    return check


_AVAILABLE = {"cuda": _same_device("cuda"), "npu": _same_device("npu")}


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               ignore_index: int = -100, tp_group="default", sequence_parallel: bool = False,
                               chunk_size: int | None = None, force_impl: str | None = None) -> torch.Tensor:
    """Per-token loss [b, s] (fp32) of ``hidden @ weight^T`` against ``labels``.

    hidden [s, b, h] (with ``sequence_parallel``: this rank's [s/tp, b, h] slice), weight [v/tp, h] (this rank's
    vocab shard), labels [b, s] global ids. ``tp_group``: the tensor-parallel process group; "default" takes
    megatron's when initialised with more than one rank, None means no TP. As megatron's output layer does,
    the hidden states enter through ``copy_to_tensor_model_parallel_region`` (all-gather with sequence
    parallel), so their gradient is summed over the TP ranks. ``chunk_size``: tokens per chunk (default
    ``CHUNK_ELEMENTS // (v/tp)``).
    """
    group = default_tp_group() if tp_group == "default" else tp_group
    if group is not None and group.size() == 1:
        group = None
    if group is not None:
        from megatron.core.tensor_parallel.mappings import (
            copy_to_tensor_model_parallel_region,
            gather_from_sequence_parallel_region,
        )

        if sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True, group=group)
        else:
            hidden = copy_to_tensor_model_parallel_region(hidden, group)
    if hidden.dim() != 3 or labels.dim() != 2 or tuple(labels.shape) != (hidden.shape[1], hidden.shape[0]):
        raise ValueError(f"fused_linear_cross_entropy: hidden {tuple(hidden.shape)} and labels "
                         f"{tuple(labels.shape)}; expected hidden [s, b, h] and labels [b, s]")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"fused_linear_cross_entropy: weight {tuple(weight.shape)}; expected [v/tp, "
                         f"{hidden.shape[2]}]")
    s, b, h = hidden.shape
    vocab_start = 0 if group is None else torch.distributed.get_rank(group) * weight.shape[0]
    x = hidden.reshape(s * b, h)
    flat_labels = labels.t().reshape(s * b)
    impl = select("fused_linear_cross_entropy", force_impl, _AVAILABLE, x, weight)
    loss = _IMPLS[impl](x, weight, flat_labels, ignore_index, vocab_start, group, chunk_size)
    return loss.view(s, b).t().contiguous()
