"""Cross-entropy of the output layer fused with its matmul: per-token loss from hidden states and the output
weight, without the [tokens, vocab] fp32 logits ever existing whole; vocab-parallel aware.

``fused_linear_cross_entropy(hidden [s, b, h], weight [v/tp, h], labels [b, s]) -> loss [b, s]`` (fp32; 0 where
the label is ``ignore_index``). Labels are global vocab ids aligned with ``hidden`` (already shifted). With
tensor parallelism each rank holds rows ``[tp_rank * v/tp, (tp_rank + 1) * v/tp)`` of the weight (megatron's
vocab-parallel output layer); the max, the sum of exponentials and the target logit are reduced over the TP
group, so every rank returns the full loss.

- reference: full logits ``(hidden @ weight^T).float()``, gathered over TP, then ``F.cross_entropy``;
- cuda / npu: the chunked implementation below: tokens in chunks of about ``CHUNK_ELEMENTS / (v/tp)``, each
  chunk's logits living only inside the loop; its matmuls are the device's GEMMs. Per chunk, the softmax
  statistics and the logit gradient are two Triton passes over the matmul's bf16 output on CUDA (gradient
  written in place), torch ops on fp32 copies on NPU.

Gradients (``_ChunkedLinearCE``): with p = softmax(logits) and y the one-hot label, dlogits = g * (p - y) for
the incoming per-token gradient g; dhidden = dlogits @ W, dW = dlogits^T @ hidden, chunk by chunk. When the
weight is frozen (LoRA) dhidden / g is computed in the forward pass, so backward is one multiply and the
logits are never recomputed; otherwise backward recomputes each chunk's logits from the saved log-sum-exp.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mindspeed_lora.ops.dispatch import cuda_availability, select

CHUNK_ELEMENTS = 1 << 26  # logits per chunk: 128 MiB in bf16 (the torch path adds fp32 copies)


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


class _TorchChunkKernels:
    """The per-chunk softmax statistics and gradient in torch ops (fp32 copies of the chunk's logits)."""

    @staticmethod
    def stats(logits, label):
        lf = logits.float()
        row_max = lf.max(dim=-1).values
        sum_exp = torch.exp(lf - row_max[:, None]).sum(dim=-1)
        target = lf.gather(1, label.clamp_min(0)[:, None]).squeeze(1)
        return row_max, sum_exp, torch.where(label >= 0, target, torch.zeros_like(target))

    @staticmethod
    def grad_(logits, lse, label, scale):
        probs = (logits.float() - lse[:, None]).exp_()
        probs.scatter_add_(1, label.clamp_min(0)[:, None], -(label >= 0)[:, None].to(probs.dtype))
        return probs.mul_(scale[:, None]).to(logits.dtype)


class _TritonChunkKernels:
    """The same on CUDA: one Triton pass for the statistics, one writing the gradient over the logits in place,
    both on the matmul's own output dtype (no fp32 copy of the chunk)."""

    @staticmethod
    def stats(logits, label):
        from mindspeed_lora.ops.triton_kernels import ce_chunk_stats

        return ce_chunk_stats(logits, label)

    @staticmethod
    def grad_(logits, lse, label, scale):
        from mindspeed_lora.ops.triton_kernels import ce_chunk_grad_

        return ce_chunk_grad_(logits, lse, label, scale)


class _ChunkedLinearCE(torch.autograd.Function):
    """Per-token CE of x @ W^T over a vocab shard; see the module docstring for the algebra.

    ``label`` holds each token's label index within this shard, -1 where the label is on another rank or
    ignored; ``valid`` is False where the label is ignored.
    """

    @staticmethod
    def forward(ctx, x, weight, label, valid, group, chunk, kernels):
        tokens = x.shape[0]
        loss = torch.empty(tokens, dtype=torch.float32, device=x.device)
        lse = torch.empty(tokens, dtype=torch.float32, device=x.device)
        scale = valid.float()
        precompute = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        dx_unit = torch.empty_like(x) if precompute else None
        for start in range(0, tokens, chunk):
            rows = slice(start, min(tokens, start + chunk))
            logits = x[rows] @ weight.t()
            row_max, sum_exp, target = kernels.stats(logits, label[rows])
            if group is not None:
                global_max = row_max.clone()
                torch.distributed.all_reduce(global_max, op=torch.distributed.ReduceOp.MAX, group=group)
                sum_exp = sum_exp * torch.exp(row_max - global_max)
                torch.distributed.all_reduce(sum_exp, group=group)
                torch.distributed.all_reduce(target, group=group)
                row_max = global_max
            lse[rows] = sum_exp.log() + row_max
            loss[rows] = lse[rows] - target
            if precompute:
                dx_unit[rows] = kernels.grad_(logits, lse[rows], label[rows], scale[rows]) @ weight
        loss.masked_fill_(~valid, 0.0)
        ctx.precompute = precompute
        ctx.chunk = chunk
        ctx.kernels = kernels
        if precompute:
            ctx.save_for_backward(dx_unit, valid)
        else:
            ctx.save_for_backward(x, weight, label, valid, lse)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.precompute:
            dx_unit, valid = ctx.saved_tensors
            g = (grad_loss.float() * valid)[:, None]
            return (dx_unit * g).to(dx_unit.dtype), None, None, None, None, None, None
        x, weight, label, valid, lse = ctx.saved_tensors
        g = grad_loss.float() * valid
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx = torch.empty_like(x) if need_x else None
        # dW accumulates in the weight's dtype inside the GEMM (addmm_): an fp32 copy of each chunk's [v, h]
        # product cost more than the GEMM itself on an H100 (bench/README.md)
        dw = torch.zeros_like(weight) if need_w else None
        for start in range(0, x.shape[0], ctx.chunk):
            rows = slice(start, min(x.shape[0], start + ctx.chunk))
            dlogits = ctx.kernels.grad_(x[rows] @ weight.t(), lse[rows], label[rows], g[rows])
            if need_x:
                dx[rows] = dlogits @ weight
            if need_w:
                dw.addmm_(dlogits.t(), x[rows])
        return dx, dw, None, None, None, None, None


def _chunked(x, weight, labels, ignore_index, vocab_start, group, chunk_size, kernels=_TorchChunkKernels):
    chunk = chunk_size or max(1, CHUNK_ELEMENTS // weight.shape[0])
    valid = labels != ignore_index
    local = labels - vocab_start
    owned = valid & (local >= 0) & (local < weight.shape[0])
    label = torch.where(owned, local, torch.full_like(local, -1))
    return _ChunkedLinearCE.apply(x, weight, label, valid, group, chunk, kernels)


def _chunked_triton(*args):
    return _chunked(*args, kernels=_TritonChunkKernels)


def _reference(x, weight, labels, ignore_index, vocab_start, group, chunk_size):
    logits = (x @ weight.t()).float()
    if group is not None:
        from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

        logits = gather_from_tensor_model_parallel_region(logits, group)
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")


_IMPLS = {"reference": _reference, "cuda": _chunked_triton, "npu": _chunked}


def _npu_check(forced: bool, tensors: tuple) -> str | None:
    if forced:  # plain torch: runs wherever the tensors are
        return None
    off = {t.device.type for t in tensors} - {"npu"}
    return f"tensors on {sorted(off)}" if off else None


_AVAILABLE = {"cuda": cuda_availability(needs_triton=True), "npu": _npu_check}


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
