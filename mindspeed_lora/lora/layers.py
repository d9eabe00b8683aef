"""LoRA around megatron-core's tensor-parallel linears, dropped into the layer spec in their place.

Each class builds megatron's own linear as ``base_layer`` (with the exact arguments megatron passes, frozen)
and adds ``lora_A.default.weight`` / ``lora_B.default.weight`` (peft's names), so a state dict reads
``<prefix>.base_layer.weight``, ``<prefix>.lora_A.default.weight``, ``<prefix>.lora_B.default.weight``.

Layout under tensor parallelism (t = TP size; the converter reads and writes exactly this):

  column-parallel base (linear_qkv, linear_fc1), W [out/t, in]:
      A [r, in]    replicated on every TP rank
      B [out/t, r] rows sharded like W's rows (qkv interleaved per query group; fc1 [gate_i; up_i])
  row-parallel base (linear_proj, linear_fc2), W [out, in/t]:
      A [r, in/t]  columns sharded like W's columns
      B [out, r]   replicated

so the merge W + s·B·A stays local to each shard. Output = base(x) + s · B(A(dropout(x))), s = alpha/r
(or alpha/sqrt(r)).

Communication of the unfused path (CCLoRA in ``cclora.py`` overlaps these with the matmuls):

  column, no SP: x is replicated; a = x·Aᵀ is the same on all ranks; backward all-reduces the partial
      da = g_i·B_i over TP, so dA and the LoRA input grad are complete on every rank.
  column, SP:   x is this rank's sequence block; a_i = x_i·Aᵀ is all-gathered along the sequence, and the
      backward reduce-scatters da. dA = da_iᵀ·x_i then covers this rank's tokens only: A is marked
      ``sequence_parallel`` so megatron's finalize_model_grads sums it over TP (as for layer norms).
  row, no SP:   a = all-reduce(x_i·A_iᵀ) (the partial sums over input shards), out += s·a·Bᵀ.
  row, SP:      a = reduce-scatter(x_i·A_iᵀ) along the sequence; B sees this rank's tokens only and is
      marked ``sequence_parallel`` for the same TP sum of its grad.

Collectives on ``a`` move tokens x r values, not tokens x hidden.

On one rank (no collectives) the base GEMM accumulates into the adapter's product instead
(``FrozenBaseLoraFunction``).
"""
from __future__ import annotations

import hashlib
import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    set_tensor_model_parallel_attributes,
)
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from torch import nn

from mindspeed_lora.errors import UserError
from mindspeed_lora.lora.config import LoraConfig
from mindspeed_lora.models.recompute import recomputation_discards_outputs

ADAPTER = "default"  # peft's adapter name, part of every state-dict key


def lora_seed(name: str, seed: int) -> int:
    """A 63-bit generator seed from the global seed and a module's global name (stable across runs and TP)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class LoraWeight(nn.Module):
    """Holds one adapter matrix as ``.weight`` (like peft's nn.Linear), allocated without touching any RNG.

    Layers use it by calling it, never by reading ``.weight`` directly: module hooks then see the use, and
    megatron's DDP waits in a forward pre-hook for an overlapped parameter all-gather (--overlap-param-gather).
    """

    def __init__(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rows, cols, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """x·Wᵀ, or the weight itself when called without input (for fused kernels that take the matrix)."""
        return self.weight if x is None else F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}x{self.weight.shape[1]}"


def _scaled_mm(mat1: torch.Tensor, mat2: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha·mat1·mat2 in one GEMM (the scale in cuBLAS's alpha, not a separate elementwise kernel)."""
    out = torch.empty((mat1.shape[0], mat2.shape[1]), dtype=mat1.dtype, device=mat1.device)
    return out.addmm_(mat1, mat2, beta=0, alpha=alpha)  # beta=0: out's uninitialised values are ignored


def adapter_weight_grad(param: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor, alpha: float):
    """param's gradient alpha·mat1·mat2; accumulated straight into megatron's ``main_grad`` where DDP keeps one.

    megatron's gradient-accumulation fusion: the GEMM adds into the (usually fp32) grad buffer, so the
    adapter gradient is never rounded to bf16, and neither a bf16 grad tensor nor DDP's hook ``main_grad +=
    grad`` (one kernel per adapter matrix per step) is needed. As megatron's own linears do, autograd then
    gets an uninitialised placeholder and ``grad_added_to_main_grad`` tells DDP's hook to skip the add.
    """
    main = getattr(param, "main_grad", None)
    if main is None or not hasattr(param, "grad_added_to_main_grad") or getattr(param, "zero_out_wgrad", False):
        return _scaled_mm(mat1, mat2, alpha)
    if main.dtype == mat1.dtype:
        main.addmm_(mat1, mat2, alpha=alpha)
    elif main.device.type == "cuda":  # cuBLAS: bf16/fp16 inputs, fp32 accumulator
        torch.addmm(main, mat1, mat2, out_dtype=main.dtype, alpha=alpha, out=main)
    else:
        main.add_(torch.mm(mat1, mat2), alpha=alpha)
    param.grad_added_to_main_grad = True
    return torch.empty(param.shape, dtype=param.dtype, device=param.device)


class FrozenBaseLoraFunction(torch.autograd.Function):
    """y = x·Wᵀ + s·(x_l·Aᵀ)·Bᵀ with W frozen, the LoRA product accumulated into the base GEMM's output.

    For a linear with no tensor-parallel communication (TP=1, no bias). The unfused layer writes x·Wᵀ and the
    adapter's product to two tensors and adds them (one more read and write of the whole output, forward,
    and of the whole input grad, backward); here the big GEMMs accumulate into the small-rank products with
    ``addmm_`` (dx = g·W + s·(g·B)·A likewise), and s rides in the GEMMs' alpha. Saved: x_l and a = x_l·Aᵀ,
    as the unfused path saves; W gets no grad; the adapters' grads go straight into megatron's main_grad
    (``adapter_weight_grad``). ``x_l`` is x after LoRA dropout, or None when there is none (then dx is one fused
    GEMM).

    ``output_unused``: only the backward graph of this call matters, not its value (the recomputation of
    ``--recompute-method split``, see models/recompute.py): a is computed and saved, the two GEMMs that
    make y are skipped and y is left uninitialised.
    """

    @staticmethod
    def forward(ctx, x, x_l, weight, lora_a, lora_b, scaling, output_unused=False):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xl2 = x2 if x_l is None else x_l.reshape(-1, shape[-1])
        a = torch.mm(xl2, lora_a.t())
        if output_unused:
            y = torch.empty((x2.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
        else:
            y = _scaled_mm(a, lora_b.t(), scaling)
            y.addmm_(x2, weight.t())
        ctx.save_for_backward(xl2, a, weight, lora_a, lora_b)
        ctx.scaling, ctx.shape, ctx.dropout = scaling, shape, x_l is not None
        return y.view(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        xl2, a, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])
        gb = torch.mm(g, lora_b)  # s·gb is dL/da: dA = s·gbᵀ·x_l, the LoRA input grad = s·gb·A
        d_b = adapter_weight_grad(lora_b, g.t(), a, s) if ctx.needs_input_grad[4] else None
        d_a = adapter_weight_grad(lora_a, gb.t(), xl2, s) if ctx.needs_input_grad[3] else None
        dx = dxl = None
        if ctx.dropout:
            if ctx.needs_input_grad[0]:
                dx = torch.mm(g, weight).view(ctx.shape)
            if ctx.needs_input_grad[1]:
                dxl = _scaled_mm(gb, lora_a, s).view(ctx.shape)
        elif ctx.needs_input_grad[0]:
            dx = _scaled_mm(gb, lora_a, s)
            dx.addmm_(g, weight)
            dx = dx.view(ctx.shape)
        return dx, dxl, None, d_a, d_b, None, None


class _LoraParallelLinear(nn.Module):
    """Shared part: base layer, adapter params, init, the attributes megatron reads off a linear."""

    base_class: type
    parallel_mode: str  # "column" | "row"

    def __init__(self, input_size: int, output_size: int, *, lora_config: LoraConfig, config, init_method,
                 **kwargs):
        super().__init__()
        if not isinstance(lora_config, LoraConfig):
            raise TypeError(f"lora_config must be a LoraConfig, got {type(lora_config).__name__}")
        if kwargs.get("is_expert"):
            # Expert linears run under expert-tensor-parallelism with their own groups and grad paths.
            raise UserError("LoRA on MoE expert linears is not supported; remove expert linears from "
                            "--lora-target-modules")
        self.base_layer = self.base_class(input_size, output_size, config=config, init_method=init_method,
                                          **kwargs)
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        self.lora_config = lora_config
        self.scaling = lora_config.scaling
        self.fusion = lora_config.fusion
        group = self.base_layer.tp_group
        self.tp_size = group.size() if group is not None else 1
        self.tp_rank = group.rank() if group is not None else 0
        self.sequence_parallel = self.base_layer.sequence_parallel if self.tp_size > 1 else False
        weight = self.base_layer.weight
        r = lora_config.r
        self.full_in_features = input_size
        if self.parallel_mode == "column":
            a_shape, b_shape = (r, input_size), (weight.shape[0], r)
        else:
            a_shape, b_shape = (r, weight.shape[1]), (output_size, r)
        self.lora_A = nn.ModuleDict({ADAPTER: LoraWeight(*a_shape, weight.dtype, weight.device)})
        self.lora_B = nn.ModuleDict({ADAPTER: LoraWeight(*b_shape, weight.dtype, weight.device)})
        sharded, replicated, dim = ((self.lora_B[ADAPTER].weight, self.lora_A[ADAPTER].weight, 0)
                                    if self.parallel_mode == "column"
                                    else (self.lora_A[ADAPTER].weight, self.lora_B[ADAPTER].weight, 1))
        # Megatron's grad-norm counts a param without tensor_model_parallel only on TP rank 0.
        set_tensor_model_parallel_attributes(sharded, True, dim, 1)
        # The replicated factor sees only this rank's tokens under SP: finalize_model_grads sums its grad.
        replicated.sequence_parallel = self.sequence_parallel
        for p in (sharded, replicated):
            p.allreduce = True  # data-parallel reduction (megatron's flag; False only for expert params)
        self.lora_dropout = nn.Dropout(lora_config.dropout) if lora_config.dropout > 0 else None
        self.adapter_enabled = True
        """False: forward is the base layer's alone (``toggle.adapters_disabled``, DPO's reference model)."""
        self.recompute_skips_output = False
        """Set by ``--recompute-method split`` on linear_proj / linear_fc2: their output only feeds the residual
        add that ends a recomputed half-layer, so the recomputation skips the GEMMs that make it (TP=1 path;
        see models/recompute.py)."""
        self.cclora_impl: str | None = None
        """CCLoRA collectives: None picks by device (torch_npu fused ops on NPUs), 'generic' or 'npu' forces."""
        self.reset_lora_parameters("", 0)

    # ------------------------------------------------------------------ adapter parameters

    @property
    def lora_a(self) -> nn.Parameter:
        return self.lora_A[ADAPTER].weight

    @property
    def lora_b(self) -> nn.Parameter:
        return self.lora_B[ADAPTER].weight

    @torch.no_grad()
    def reset_lora_parameters(self, name: str, seed: int) -> None:
        """A ~ kaiming-uniform(a=sqrt(5)) over the FULL fan-in (peft's init), B = 0.

        The full A is drawn on every TP rank from a generator seeded by (seed, name) and this rank's slice
        kept, so a model's adapters do not depend on the TP size or on the order modules are built in.
        """
        gen = torch.Generator().manual_seed(lora_seed(name, seed))
        full = torch.empty(self.lora_config.r, self.full_in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=gen)
        if self.parallel_mode == "row":
            full = full.chunk(self.tp_size, dim=1)[self.tp_rank]
        self.lora_a.copy_(full)
        self.lora_b.zero_()

    # ------------------------------------------------------------------ what megatron reads off a linear

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    @property
    def config(self):
        return self.base_layer.config

    @property
    def input_size(self) -> int:
        return self.base_layer.input_size

    @property
    def output_size(self) -> int:
        return self.base_layer.output_size

    @property
    def skip_bias_add(self) -> bool:
        return self.base_layer.skip_bias_add

    @property
    def tp_group(self):
        return self.base_layer.tp_group

    @property
    def is_expert(self) -> bool:
        return self.base_layer.is_expert

    def backward_dw(self) -> None:
        self.base_layer.backward_dw()

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        # Megatron's distributed checkpoint format would need swiglu/qkv-aware factories for the adapters;
        # we save the legacy per-rank format only, so fail loudly instead of writing a wrong layout.
        raise UserError("LoRA layers do not support megatron's distributed checkpoint format; "
                        "use the legacy per-rank checkpoints that posttrain_gpt.py writes")

    def _dropout_context(self, tokens_differ_across_tp: bool):
        """Dropout masks: identical on TP ranks where they hold the same tokens and features (replicated A
        must see one mask), independent (megatron's model-parallel RNG) where each rank holds its own slice."""
        return get_cuda_rng_tracker().fork() if tokens_differ_across_tp and self.tp_size > 1 else nullcontext()

    def _fused_base_applies(self) -> bool:
        """Whether ``FrozenBaseLoraFunction`` computes exactly what base + adapter compute here: one rank (no
        TP collectives around the GEMM), no bias, and megatron's plain frozen-weight linear underneath."""
        base = self.base_layer
        return (self.tp_size == 1 and base.bias is None and not base.weight.requires_grad
                and not getattr(base.config, "defer_embedding_wgrad_compute", False)
                and getattr(base.config, "_cpu_offloading_context", None) is None)

    def _fused_base_forward(self, x: torch.Tensor) -> torch.Tensor:
        x_l = None
        if self.lora_dropout is not None:
            with self._dropout_context(False):
                x_l = self.lora_dropout(x)
        unused = self.recompute_skips_output and recomputation_discards_outputs()
        return FrozenBaseLoraFunction.apply(x, x_l, self.base_layer.weight, self.lora_A[ADAPTER](),
                                            self.lora_B[ADAPTER](), self.scaling, unused)

    def extra_repr(self) -> str:
        c = self.lora_config
        return f"r={c.r}, scaling={self.scaling:g}, dropout={c.dropout}, fusion={c.fusion}, tp={self.tp_size}"


class LoraColumnParallelLinear(_LoraParallelLinear):
    """megatron ColumnParallelLinear + LoRA (A replicated, B row-sharded like the base weight)."""

    base_class = ColumnParallelLinear
    parallel_mode = "column"

    def __init__(self, input_size: int, output_size: int, *, lora_config: LoraConfig, config, init_method,
                 **kwargs):
        if kwargs.get("gather_output"):
            raise UserError("LoRA on a ColumnParallelLinear with gather_output=True is not supported")
        super().__init__(input_size, output_size, lora_config=lora_config, config=config,
                         init_method=init_method, **kwargs)

    @property
    def gather_output(self) -> bool:
        return self.base_layer.gather_output

    @property
    def output_size_per_partition(self) -> int:
        return self.base_layer.output_size_per_partition

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None,
                runtime_gather_output: bool | None = None):
        """x [s/t (SP) or s, b, in] -> (out [s, b, out/t], bias or None)."""
        if weight is not None or runtime_gather_output:
            raise UserError("LoRA linears take no external weight and do not gather their output")
        if not self.adapter_enabled:
            return self.base_layer(x)
        if self.fusion:
            from mindspeed_lora.lora.cclora import column_forward

            return column_forward(self, x)
        if self._fused_base_applies():
            return self._fused_base_forward(x), None
        out, bias = self.base_layer(x)
        if self.lora_dropout is not None:
            with self._dropout_context(self.sequence_parallel):
                x = self.lora_dropout(x)
        a = self.lora_A[ADAPTER](x) * self.scaling
        if self.tp_size > 1:
            if self.sequence_parallel:
                # forward all-gather along s; backward reduce-scatter sums the partial da = g_i·B_i
                a = gather_from_sequence_parallel_region(a, tensor_parallel_output_grad=True,
                                                         group=self.tp_group)
            else:
                # forward identity; backward all-reduce of the partial da = g_i·B_i
                a = copy_to_tensor_model_parallel_region(a, group=self.tp_group)
        return out + self.lora_B[ADAPTER](a), bias


class LoraRowParallelLinear(_LoraParallelLinear):
    """megatron RowParallelLinear + LoRA (A column-sharded like the base weight, B replicated)."""

    base_class = RowParallelLinear
    parallel_mode = "row"

    def __init__(self, input_size: int, output_size: int, *, lora_config: LoraConfig, config, init_method,
                 **kwargs):
        if not kwargs.get("input_is_parallel", False):
            raise UserError("LoRA on a RowParallelLinear needs input_is_parallel=True (megatron's layers pass it)")
        super().__init__(input_size, output_size, lora_config=lora_config, config=config,
                         init_method=init_method, **kwargs)

    @property
    def input_is_parallel(self) -> bool:
        return self.base_layer.input_is_parallel

    @property
    def input_size_per_partition(self) -> int:
        return self.base_layer.input_size_per_partition

    def forward(self, x: torch.Tensor):
        """x [s, b, in/t] -> (out [s/t (SP) or s, b, out], bias or None)."""
        if not self.adapter_enabled:
            return self.base_layer(x)
        if self.fusion:
            from mindspeed_lora.lora.cclora import row_forward

            return row_forward(self, x)
        if self._fused_base_applies():
            return self._fused_base_forward(x), None
        out, bias = self.base_layer(x)
        if self.lora_dropout is not None:
            with self._dropout_context(True):
                x = self.lora_dropout(x)
        a = self.lora_A[ADAPTER](x) * self.scaling  # partial sums over this rank's input features
        if self.tp_size > 1:
            if self.sequence_parallel:
                a = reduce_scatter_to_sequence_parallel_region(a, group=self.tp_group)
            else:
                a = reduce_from_tensor_model_parallel_region(a, group=self.tp_group)
        return out + self.lora_B[ADAPTER](a), bias


LORA_CLASSES = {"linear_qkv": LoraColumnParallelLinear, "linear_fc1": LoraColumnParallelLinear,
                "linear_proj": LoraRowParallelLinear, "linear_fc2": LoraRowParallelLinear}
