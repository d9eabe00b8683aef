"""CCLoRA: LoRA matmuls overlapped with the tensor-parallel collectives of megatron's linears (--lora-fusion).

One ``torch.autograd.Function`` per case; they compute exactly what the unfused LoRA layers compute
(``layers.py``), including which grads are partial (A of a column layer under SP, B of a row layer under SP:
``sequence_parallel`` params that megatron's finalize_model_grads sums over TP), but reorder the work so that
every collective is in flight while a matmul that does not depend on it runs.

Notation (per rank; t = TP size; tokens flattened, n = s·b, n_t = n/t under SP):
  x input, W frozen base weight, A [r, in(/t)], B [out(/t), r], s scaling, A_s = s·A,
  W_c = W + B·A_s (the merged weight, built with one addmm), g = dL/dy, a = x·A_sᵀ.

Collectives are ``torch.distributed`` async ops (nccl, hccl, gloo). Stream-ordering assumptions, valid for all
three backends: an async op is enqueued on the backend's own stream/thread at the call, so the matmuls issued
before ``wait()`` run concurrently with it; ``wait()`` orders the current stream after the collective (no host
sync on nccl/hccl); c10d keeps the input and output alive until the work completes, and we neither modify a
collective's input nor read its output before ``wait()``. On NPUs the two fused ops of torch_npu
(``npu_all_gather_base_mm``, ``npu_mm_reduce_scatter_base``) replace a collective + the matmul that consumes or
produces it, pipelining the two inside one kernel, where their documented constraints hold (``NpuCollectives``).

Precision: W_c is rounded once to the parameter dtype (addmm accumulates in fp32): in bf16 runs the adapter's
contribution to the forward is that of a merged bf16 weight, as in MindSpeed-LLM's CCLoRA; grads of A and B
use the separate factors and, under megatron's DDP, are accumulated by the GEMM straight into the params'
fp32 ``main_grad`` (``layers.adapter_weight_grad``).
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch
import torch.distributed as dist

from mindspeed_lora.errors import UserError
from mindspeed_lora.lora.layers import adapter_weight_grad

# ----------------------------------------------------------------------------------------------- collectives

class GenericCollectives:
    """Async torch.distributed collectives along dim 0 of 2-D tensors, and the collective+matmul pairs."""

    name = "generic"

    def __init__(self, group):
        self.group = group
        self.world = dist.get_world_size(group)

    def all_gather_start(self, x: torch.Tensor):
        out = torch.empty((x.shape[0] * self.world, *x.shape[1:]), dtype=x.dtype, device=x.device)
        return out, dist.all_gather_into_tensor(out, x.contiguous(), group=self.group, async_op=True)

    def reduce_scatter_start(self, x: torch.Tensor):
        if x.shape[0] % self.world:
            raise UserError(f"CCLoRA: {x.shape[0]} tokens cannot be reduce-scattered over {self.world} TP ranks")
        out = torch.empty((x.shape[0] // self.world, *x.shape[1:]), dtype=x.dtype, device=x.device)
        return out, dist.reduce_scatter_tensor(out, x.contiguous(), group=self.group, async_op=True)

    def all_reduce_start(self, x: torch.Tensor):
        x = x.contiguous()
        return x, dist.all_reduce(x, group=self.group, async_op=True)

    def all_gather_mm(self, x_local: torch.Tensor, prepare: Callable[[], tuple]):
        """(all_gather(x_local) @ w, all_gather(x_local), extras) where (w, *extras) = prepare().

        ``prepare`` runs while the all-gather is in flight (it builds the weight and may do other work).
        """
        x_full, handle = self.all_gather_start(x_local)
        w, *extras = prepare()
        handle.wait()
        return x_full @ w, x_full, extras

    def mm_reduce_scatter_start(self, x: torch.Tensor, w: torch.Tensor):
        """reduce_scatter(x @ w) and a function that waits for it; work issued before the wait overlaps it."""
        out, handle = self.reduce_scatter_start(x @ w)
        return out, handle.wait


_FUSED_WORLD_SIZES = (2, 4, 8)  # Atlas A2 (HCCS all-mesh); wider TP groups span nodes and go the generic way
_FUSED_K = (256, 65535)  # k in [256, 65535)


class NpuCollectives(GenericCollectives):
    """torch_npu's fused collective-matmul ops where their documented constraints hold, else the generic path.

    Constraints (torch_npu API reference for npu_all_gather_base_mm / npu_mm_reduce_scatter_base): 2-D
    fp16/bf16 operands of one dtype; k (the contracted dim) in [256, 65535); the left operand not a transposed
    view (the right one may be); reduce-scatter rows divisible by the world size; world size 2, 4 or 8; no bias;
    one communication domain for all fused ops of a model (ours: the TP group).
    """

    name = "npu"

    def __init__(self, group, torch_npu=None, hcom: str | None = None):
        super().__init__(group)
        self.torch_npu = torch_npu if torch_npu is not None else importlib.import_module("torch_npu")
        self.hcom = hcom if hcom is not None else hccl_comm_name(group)

    def _fusable(self, x: torch.Tensor, scatter_rows: bool) -> bool:
        """Whether the left operand ``x`` [m, k] meets the fused ops' constraints (the weight must also have
        x's dtype; it may be a transposed view)."""
        return (self.world in _FUSED_WORLD_SIZES and x.dtype in (torch.float16, torch.bfloat16)
                and x.dim() == 2 and x.is_contiguous() and _FUSED_K[0] <= x.shape[1] < _FUSED_K[1]
                and (not scatter_rows or x.shape[0] % self.world == 0))

    def all_gather_mm(self, x_local, prepare):
        x_local = x_local.contiguous()
        if not self._fusable(x_local, scatter_rows=False):
            return super().all_gather_mm(x_local, prepare)
        w, *extras = prepare()  # the fused op needs the weight first; it overlaps gather and matmul itself
        if w.dtype != x_local.dtype:
            return super().all_gather_mm(x_local, lambda: (w, *extras))
        y, x_full = self.torch_npu.npu_all_gather_base_mm(x_local, w, self.hcom, self.world, gather_index=0,
                                                          gather_output=True)
        return y, x_full, extras

    def mm_reduce_scatter_start(self, x, w):
        x = x.contiguous()
        if not self._fusable(x, scatter_rows=True) or w.dtype != x.dtype:
            return super().mm_reduce_scatter_start(x, w)
        return self.torch_npu.npu_mm_reduce_scatter_base(x, w, self.hcom, self.world, reduce_op="sum"), _no_wait


def _no_wait():
    return None


_HCOM: dict = {}


def hccl_comm_name(group) -> str:
    """The HCCL communicator name torch_npu's fused ops take for ``group`` (cached per group)."""
    if group not in _HCOM:
        rank = dist.get_global_rank(group, dist.get_rank(group))
        _HCOM[group] = group._get_backend(torch.device("npu")).get_hccl_comm_name(rank)
    return _HCOM[group]


def collectives_for(group, device_type: str, force_impl: str | None = None) -> GenericCollectives:
    """NPU fused ops on an NPU with torch_npu (or when forced), else torch.distributed's async collectives."""
    if force_impl not in (None, "generic", "npu"):
        raise ValueError(f"force_impl={force_impl!r}; expected None, 'generic' or 'npu'")
    if force_impl == "npu" or (force_impl is None and device_type == "npu" and _has_fused_ops()):
        return NpuCollectives(group)
    return GenericCollectives(group)


def _has_fused_ops() -> bool:
    try:
        mod = importlib.import_module("torch_npu")
    except ImportError:
        return False
    return hasattr(mod, "npu_all_gather_base_mm") and hasattr(mod, "npu_mm_reduce_scatter_base")


# ----------------------------------------------------------------------------------------------- functions

def _merged(weight, lora_a_s, lora_b):
    """W_c = W + B·A_s in one addmm (fp32 accumulation, one rounding)."""
    return torch.addmm(weight, lora_b, lora_a_s)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class NoTensorParallelLoRA(torch.autograd.Function):
    """TP = 1: y = x·W_cᵀ when tokens >= in_features (one GEMM), else y = x·Wᵀ + (x·A_sᵀ)·Bᵀ.

    backward: ga = g·B;  dB = gᵀ·a;  dA = s·gaᵀ·x;  dx = g·W_c (merged) or g·W + ga·A_s. No communication.
    """

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scaling):
        x2 = _flat(x)
        a_s = lora_a * scaling
        a = x2 @ a_s.t()
        combine = x2.shape[0] >= x2.shape[1]
        if combine:
            y = x2 @ _merged(weight, a_s, lora_b).t()
        else:
            y = torch.addmm(x2 @ weight.t(), a, lora_b.t())
        ctx.save_for_backward(x, weight, lora_a, lora_b, a)
        ctx.scaling, ctx.combine = scaling, combine
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_a, lora_b, a = ctx.saved_tensors
        g, x2 = _flat(grad), _flat(x)
        a_s = lora_a * ctx.scaling
        ga = g @ lora_b
        d_b = adapter_weight_grad(lora_b, g.t(), a, 1.0)
        d_a = adapter_weight_grad(lora_a, ga.t(), x2, ctx.scaling)
        dx = g @ _merged(weight, a_s, lora_b) if ctx.combine else torch.addmm(g @ weight, ga, a_s)
        return dx.view_as(x), None, d_a, d_b, None


class ColumnParallelLoRA(torch.autograd.Function):
    """Column-parallel, no SP (x replicated, B and W row-sharded, A replicated).

    forward:  y_i = x·Wᵢᵀ + (x·A_sᵀ)·Bᵢᵀ   (merged x·W_cᵢᵀ when tokens >= in) -- no communication.
    backward: ga = all_reduce(g_i·Bᵢ)   overlaps   dx_i = g_i·W_cᵢ;
              dx = all_reduce(dx_i)      overlaps   dB_i = g_iᵀ·a,  dA = s·gaᵀ·x.
    """

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scaling, comm):
        x2 = _flat(x)
        a_s = lora_a * scaling
        a = x2 @ a_s.t()
        if x2.shape[0] >= x2.shape[1]:
            y = x2 @ _merged(weight, a_s, lora_b).t()
        else:
            y = torch.addmm(x2 @ weight.t(), a, lora_b.t())
        ctx.save_for_backward(x, weight, lora_a, lora_b, a)
        ctx.scaling, ctx.comm = scaling, comm
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_a, lora_b, a = ctx.saved_tensors
        comm = ctx.comm
        g, x2 = _flat(grad), _flat(x)
        ga, h_ga = comm.all_reduce_start(g @ lora_b)
        dx, h_dx = comm.all_reduce_start(g @ _merged(weight, lora_a * ctx.scaling, lora_b))  # overlaps h_ga
        d_b = adapter_weight_grad(lora_b, g.t(), a, 1.0)  # overlaps h_ga / h_dx
        h_ga.wait()
        d_a = adapter_weight_grad(lora_a, ga.t(), x2, ctx.scaling)  # overlaps h_dx
        h_dx.wait()
        return dx.view_as(x), None, d_a, d_b, None, None


class ColumnSequenceParallelLoRA(torch.autograd.Function):
    """Column-parallel with SP (x_t: this rank's n_t tokens; B, W row-sharded; A replicated).

    forward:  x = all_gather(x_t)  overlaps  a_t = x_t·A_sᵀ and W_cᵢ = Wᵢ + Bᵢ·A_s;   y_i = x·W_cᵢᵀ
              (NPU: one npu_all_gather_base_mm). Only x_t and a_t are kept for backward.
    backward: a = all_gather(a_t)                   overlaps  ga_i = g_i·Bᵢ, W_cᵢ;
              ga_t = reduce_scatter(ga_i)           overlaps  dx_i = g_i·W_cᵢ;
              dx_t = reduce_scatter(dx_i)           overlaps  dB_i = g_iᵀ·a, dA_t = s·ga_tᵀ·x_t
              (NPU: dx_i + its reduce-scatter in one npu_mm_reduce_scatter_base).
              dA_t covers this rank's tokens: A is a ``sequence_parallel`` param (summed by finalize).
    """

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scaling, comm):
        x2 = _flat(x)
        a_s = lora_a * scaling
        box = {}

        def prepare():
            box["a"] = x2 @ a_s.t()
            return (_merged(weight, a_s, lora_b).t(),)

        y, _, _ = comm.all_gather_mm(x2, prepare)
        ctx.save_for_backward(x, weight, lora_a, lora_b, box["a"])
        ctx.scaling, ctx.comm = scaling, comm
        return y.view(x.shape[0] * comm.world, *x.shape[1:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_a, lora_b, a_t = ctx.saved_tensors
        comm = ctx.comm
        g, x2 = _flat(grad), _flat(x)
        a, h_a = comm.all_gather_start(a_t)
        ga_i = g @ lora_b
        w_c = _merged(weight, lora_a * ctx.scaling, lora_b)
        h_a.wait()
        ga_t, h_ga = comm.reduce_scatter_start(ga_i)
        dx, wait_dx = comm.mm_reduce_scatter_start(g, w_c)  # overlaps h_ga
        h_ga.wait()
        d_b = adapter_weight_grad(lora_b, g.t(), a, 1.0)  # overlaps the reduce-scatter of dx
        d_a = adapter_weight_grad(lora_a, ga_t.t(), x2, ctx.scaling)
        wait_dx()
        return dx.view_as(x), None, d_a, d_b, None, None


class RowParallelLoRA(torch.autograd.Function):
    """Row-parallel, no SP (x_i: this rank's input features; A, W column-sharded; B replicated).

    forward:  a = all_reduce(x_i·A_sᵢᵀ)   overlaps  y_i = x_i·Wᵢᵀ;
              y = all_reduce(y_i)          overlaps  l = a·Bᵀ;       y + l.
    backward: (g replicated) ga = g·B;  dB = gᵀ·a;  dA_i = s·gaᵀ·x_i;  dx_i = g·Wᵢ + ga·A_sᵢ. No communication.
    """

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scaling, comm):
        x2 = _flat(x)
        a, h_a = comm.all_reduce_start(x2 @ (lora_a * scaling).t())
        y = x2 @ weight.t()  # overlaps h_a
        h_a.wait()
        y, h_y = comm.all_reduce_start(y)
        lora = a @ lora_b.t()  # overlaps h_y
        h_y.wait()
        ctx.save_for_backward(x, weight, lora_a, lora_b, a)
        ctx.scaling = scaling
        return (y + lora).view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_a, lora_b, a = ctx.saved_tensors
        g, x2 = _flat(grad), _flat(x)
        ga = g @ lora_b
        d_b = adapter_weight_grad(lora_b, g.t(), a, 1.0)
        d_a = adapter_weight_grad(lora_a, ga.t(), x2, ctx.scaling)
        dx = torch.addmm(g @ weight, ga, lora_a * ctx.scaling)
        return dx.view_as(x), None, d_a, d_b, None, None


class RowSequenceParallelLoRA(torch.autograd.Function):
    """Row-parallel with SP (x_i: all n tokens, this rank's input features; output: this rank's n_t tokens).

    forward:  a_t = reduce_scatter(x_i·A_sᵢᵀ)   overlaps  W_cᵢ = Wᵢ + B·A_sᵢ;
              y_t = reduce_scatter(x_i·W_cᵢᵀ)   (NPU: one npu_mm_reduce_scatter_base).
    backward: g = all_gather(g_t)  overlaps  dB_t = g_tᵀ·a_t and W_cᵢ;  dx_i = g·W_cᵢ
              (NPU: one npu_all_gather_base_mm that also returns g); the gathered g serves the LoRA path too:
              ga = g·B, dA_i = s·gaᵀ·x_i -- no separate gather of the LoRA grad.
              dB_t covers this rank's tokens: B is a ``sequence_parallel`` param (summed by finalize).
    """

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scaling, comm):
        x2 = _flat(x)
        a_s = lora_a * scaling
        a_t, h_a = comm.reduce_scatter_start(x2 @ a_s.t())
        w_c = _merged(weight, a_s, lora_b)  # overlaps h_a
        h_a.wait()
        y, wait_y = comm.mm_reduce_scatter_start(x2, w_c.t())
        wait_y()
        ctx.save_for_backward(x, weight, lora_a, lora_b, a_t)
        ctx.scaling, ctx.comm = scaling, comm
        return y.view(x.shape[0] // comm.world, *x.shape[1:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_a, lora_b, a_t = ctx.saved_tensors
        comm = ctx.comm
        g_t, x2 = _flat(grad), _flat(x)

        def prepare():
            d_b = adapter_weight_grad(lora_b, g_t.t(), a_t, 1.0)
            return _merged(weight, lora_a * ctx.scaling, lora_b), d_b

        dx, g, (d_b,) = comm.all_gather_mm(g_t, prepare)
        ga = g @ lora_b
        d_a = adapter_weight_grad(lora_a, ga.t(), x2, ctx.scaling)
        return dx.view_as(x), None, d_a, d_b, None, None


# ----------------------------------------------------------------------------------------------- layers

def _check(layer, x: torch.Tensor) -> None:
    if layer.lora_dropout is not None:
        raise UserError("--lora-fusion (CCLoRA) cannot apply --lora-dropout; use --lora-dropout 0")
    if layer.base_layer.weight.requires_grad:
        raise UserError("CCLoRA computes no gradient for the base weight, which requires grad here: freeze the "
                        "base model (mark_only_lora_trainable) or train without --lora-fusion")
    if x.dim() < 2:
        raise UserError(f"CCLoRA: input of shape {tuple(x.shape)}; expected [s, b, hidden]")


def _fused_output(layer, x: torch.Tensor, sequence_parallel_fn, tensor_parallel_fn) -> torch.Tensor:
    _check(layer, x)
    if layer.tp_size == 1 and x.is_cuda and layer.cclora_impl is None and layer._fused_base_applies():
        # Nothing to overlap at TP=1. On an H100 the merged-weight rule below ran at 0.89x of the fused
        # base+adapter GEMMs that the layer uses without --lora-fusion (bench/README.md), so CUDA takes those.
        return layer._fused_base_forward(x)
    # Calling the adapter modules (not reading .weight) runs their forward pre-hooks: megatron's DDP waits there
    # for an overlapped parameter all-gather (--overlap-param-gather) before the weight is used.
    args = (x, layer.base_layer.weight, layer.lora_A["default"](), layer.lora_B["default"](), layer.scaling)
    if layer.tp_size == 1:
        return NoTensorParallelLoRA.apply(*args)
    comm = collectives_for(layer.tp_group, layer.base_layer.weight.device.type, layer.cclora_impl)
    return (sequence_parallel_fn if layer.sequence_parallel else tensor_parallel_fn).apply(*args, comm)


def column_forward(layer, x: torch.Tensor):
    """CCLoRA forward of a ``LoraColumnParallelLinear``: (out [s, b, out/t], bias or None)."""
    base = layer.base_layer
    out = _fused_output(layer, x, ColumnSequenceParallelLoRA, ColumnParallelLoRA)
    if base.bias is not None and not base.skip_bias_add:
        out = out + base.bias
    return out, base.bias if base.skip_bias_add else None


def row_forward(layer, x: torch.Tensor):
    """CCLoRA forward of a ``LoraRowParallelLinear``: (out [s/t (SP) or s, b, out], bias or None)."""
    base = layer.base_layer
    out = _fused_output(layer, x, RowSequenceParallelLoRA, RowParallelLoRA)
    if base.skip_bias_add:
        return out, base.bias
    return (out + base.bias if base.bias is not None else out), None
