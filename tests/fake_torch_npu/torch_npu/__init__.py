"""A stand-in for ``torch_npu`` in CPU tests: the documented semantics of the torch_npu ops mindspeed_lora calls,
in plain torch (autograd gives the backward). Tests only: put ``tests/fake_torch_npu`` on ``sys.path`` inside a
test; never installed, never imported by the package itself.

It checks what the documentation requires of the caller (argument names, layouts, dtypes, contiguity, the
compressed causal mask of sparse modes 2/3, cumulative ``actual_seq_qlen``) and raises where real torch_npu
would fail or silently compute something else, so a wrong call fails the test instead of passing here.
Sources: the torch_npu API reference (Ascend op-plugin docs) for npu_rms_norm, npu_swiglu, npu_rotary_mul and
npu_fusion_attention. It defines no ``torch.npu``: the package under test is driven with ``force_impl="npu"``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__version__ = "0.0.0+fake"

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_COMPRESSED = 2048


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name}: dtype {t.dtype} not supported (float16, bfloat16, float32)")


def npu_rms_norm(self: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6):
    """y = x * rstd * gamma with rstd = 1/sqrt(mean(x^2) + eps) over gamma's dims; returns (y, rstd).

    gamma has x's dtype and x's trailing shape; rstd is fp32 with the normalised dims kept as 1.
    """
    _check_float("npu_rms_norm", self)
    if gamma.dtype != self.dtype:
        raise TypeError(f"npu_rms_norm: gamma dtype {gamma.dtype} != self dtype {self.dtype}")
    if tuple(self.shape[self.dim() - gamma.dim():]) != tuple(gamma.shape):
        raise ValueError(f"npu_rms_norm: gamma {tuple(gamma.shape)} is not the trailing shape of {tuple(self.shape)}")
    dims = tuple(range(self.dim() - gamma.dim(), self.dim()))
    xf = self.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=dims, keepdim=True) + epsilon)
    return (xf * rstd * gamma.float()).to(self.dtype), rstd


def npu_swiglu(input: torch.Tensor, dim: int = -1) -> torch.Tensor:  # noqa: A002 - torch_npu's name
    """Split ``dim`` in halves A (first), B (second); return swish(A) * B = A * sigmoid(A) * B.

    No non-contiguous input; ``dim`` must be even-sized.
    """
    _check_float("npu_swiglu", input)
    if not input.is_contiguous():
        raise RuntimeError("npu_swiglu: non-contiguous input is not supported")
    if input.shape[dim] % 2:
        raise RuntimeError(f"npu_swiglu: dim {dim} of size {input.shape[dim]} is not divisible by 2")
    a, b = torch.chunk(input, 2, dim=dim)
    return (F.silu(a.float()) * b.float()).to(input.dtype)


def _rotary_shapes_ok(x: torch.Tensor, r: torch.Tensor) -> bool:
    """r1/r2 layouts allowed for 4-D x [d0, d1, d2, D]: BNSD -> 11SD/B1SD/BNSD, BSND -> 1S1D/BS1D/BSND,
    SBND -> S11D/SB1D/SBND."""
    d0, d1, d2, d = x.shape
    allowed = {(1, 1, d2, d), (d0, 1, d2, d), (1, d1, 1, d), (d0, d1, 1, d), (d0, 1, 1, d), (d0, d1, d2, d)}
    return tuple(r.shape) in allowed


def npu_rotary_mul(input: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor,  # noqa: A002
                   rotary_mode: str = "half") -> torch.Tensor:
    """half: x1, x2 = chunk(x, 2, -1); output = r1 * x + r2 * cat(-x2, x1).
    interleave: pairs (x[..., ::2], x[..., 1::2]) rotated in place of each other.

    input, r1, r2 are 4-D of one dtype; D even and < 896; r1/r2 broadcast in one of the documented layouts.
    """
    for name, t in (("input", input), ("r1", r1), ("r2", r2)):
        _check_float("npu_rotary_mul", t)
        if t.dim() != 4:
            raise RuntimeError(f"npu_rotary_mul: {name} must be 4-D, got {tuple(t.shape)}")
    if r1.dtype != input.dtype or r2.dtype != input.dtype:
        raise TypeError("npu_rotary_mul: r1, r2 and input must share a dtype")
    d = input.shape[-1]
    if d % 2 or d >= 896:
        raise RuntimeError(f"npu_rotary_mul: D={d} must be even and < 896")
    if not (_rotary_shapes_ok(input, r1) and _rotary_shapes_ok(input, r2)):
        raise RuntimeError(f"npu_rotary_mul: r1 {tuple(r1.shape)} / r2 {tuple(r2.shape)} do not fit input "
                           f"{tuple(input.shape)} in a BNSD, BSND or SBND layout")
    x = input.float()
    if rotary_mode == "half":
        x1, x2 = torch.chunk(x, 2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
    elif rotary_mode == "interleave":
        x1, x2 = x[..., ::2], x[..., 1::2]
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    else:
        raise ValueError(f"npu_rotary_mul: rotary_mode {rotary_mode!r}; expected 'half' or 'interleave'")
    return (r1.float() * x + r2.float() * rotated).to(input.dtype)


def _to_bnsd(t: torch.Tensor, layout: str, heads: int | None, head_dim: int | None) -> torch.Tensor:
    if layout == "BNSD":
        return t
    if layout == "BSND":
        return t.transpose(1, 2)
    if layout in ("BSH", "SBH"):
        bsh = t if layout == "BSH" else t.transpose(0, 1)
        n = heads if heads is not None else bsh.shape[-1] // head_dim
        return bsh.reshape(bsh.shape[0], bsh.shape[1], n, -1).transpose(1, 2)
    raise ValueError(f"npu_fusion_attention: input_layout {layout!r} not supported")


def _from_bnsd(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "BNSD":
        return t
    if layout == "BSND":
        return t.transpose(1, 2)
    bsh = t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)
    return bsh if layout == "BSH" else bsh.transpose(0, 1)


def _check_compressed_mask(atten_mask, sparse_mode):
    if atten_mask is None:
        return
    expected = torch.ones(_COMPRESSED, _COMPRESSED, dtype=torch.bool, device=atten_mask.device).triu(1)
    if tuple(atten_mask.shape) != (_COMPRESSED, _COMPRESSED) or not torch.equal(atten_mask.bool(), expected):
        raise RuntimeError(f"npu_fusion_attention: sparse_mode={sparse_mode} needs the 2048x2048 compressed "
                           f"causal mask (True above the diagonal); got {tuple(atten_mask.shape)}")


def _mask_for(sparse_mode, atten_mask, sq, sk, pre_tockens, next_tockens, device):
    """Bool mask (True = masked) for one [sq, sk] block, or None for no mask."""
    if atten_mask is None:  # documented: without atten_mask, sparse_mode and tokens have no effect
        return None
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    if sparse_mode == 0:
        band = (j - i > next_tockens) | (i - j > pre_tockens)
        return atten_mask.bool() | band
    if sparse_mode == 1:
        return atten_mask.bool()
    if sparse_mode == 2:  # leftUpCausal
        return j > i
    if sparse_mode == 3:  # rightDownCausal
        return j > i + (sk - sq)
    raise NotImplementedError(f"fake npu_fusion_attention: sparse_mode={sparse_mode}")


def _attend(q, k, v, mask, scale, keep_prob):
    """q [B, N1, Sq, D], k/v [B, N2, Sk, D] -> (out, softmax_max, softmax_sum) with N1 % N2 == 0."""
    n1, n2 = q.shape[1], k.shape[1]
    if n1 % n2:
        raise RuntimeError(f"npu_fusion_attention: N1={n1} is not a multiple of N2={n2}")
    k = k.repeat_interleave(n1 // n2, dim=1)
    v = v.repeat_interleave(n1 // n2, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    probs = torch.softmax(scores, dim=-1)
    row_sum = torch.exp(scores - row_max).sum(dim=-1, keepdim=True)
    if keep_prob < 1.0:
        probs = F.dropout(probs, p=1.0 - keep_prob)
    return torch.matmul(probs, v.float()).to(q.dtype), row_max, row_sum


def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
                         scale=1.0, keep_prob=1.0, pre_tockens=2147483647, next_tockens=2147483647,
                         inner_precise=0, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                         gen_mask_parallel=True, sync=False):
    """softmax(mask(scale * q k^T)) v (with dropout keep_prob) -> (attention_out, softmax_max, softmax_sum,
    softmax_out, seed, offset, numels).

    Layouts BSH, SBH, BSND, BNSD, TND (varlen: ``actual_seq_qlen`` / ``actual_seq_kvlen`` are the cumulative
    lengths, e.g. lengths 2 2 2 -> [2, 4, 6]). atten_mask: True = masked, shapes BNSS, B1SS, 11SS or SS.
    sparse_mode: 0 defaultMask (atten_mask plus the pre/next_tockens band), 1 allMask, 2 leftUpCausal, 3
    rightDownCausal (per sequence in TND); 2 and 3 take the 2048x2048 compressed mask. ``scale`` defaults to 1.
    softmax_max / softmax_sum are fp32 [B, N, Sq, 8] ([T, N, 8] for TND).
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_float("npu_fusion_attention", t)
        if t.dtype != query.dtype:
            raise TypeError(f"npu_fusion_attention: {name} dtype {t.dtype} != query dtype {query.dtype}")
    if pse is not None or padding_mask is not None or prefix is not None:
        raise NotImplementedError("fake npu_fusion_attention: pse, padding_mask and prefix are not modelled")
    if sparse_mode in (2, 3):
        _check_compressed_mask(atten_mask, sparse_mode)
    if input_layout == "TND":
        return _varlen(query, key, value, head_num, atten_mask, scale, keep_prob, actual_seq_qlen, actual_seq_kvlen,
                       sparse_mode)
    if actual_seq_qlen is not None or actual_seq_kvlen is not None:
        raise RuntimeError("npu_fusion_attention: actual_seq_qlen/kvlen are for the TND layout")
    if input_layout in ("BSND", "BNSD"):
        head_dim = query.shape[-1]
    else:
        if query.shape[-1] % head_num:
            raise RuntimeError(f"npu_fusion_attention: H={query.shape[-1]} not divisible by head_num={head_num}")
        head_dim = query.shape[-1] // head_num
    q = _to_bnsd(query, input_layout, head_num, head_dim)
    k = _to_bnsd(key, input_layout, None, head_dim)
    v = _to_bnsd(value, input_layout, None, head_dim)
    if q.shape[1] != head_num:
        raise RuntimeError(f"npu_fusion_attention: head_num={head_num} but query has {q.shape[1]} heads")
    mask = _mask_for(sparse_mode, atten_mask, q.shape[2], k.shape[2], pre_tockens, next_tockens, q.device)
    if mask is not None and mask.dim() == 4 and sparse_mode in (0, 1):
        if mask.shape[0] not in (1, q.shape[0]) or mask.shape[1] not in (1, q.shape[1]):
            raise RuntimeError(f"npu_fusion_attention: atten_mask {tuple(mask.shape)} is not BNSS, B1SS or 11SS")
    out, row_max, row_sum = _attend(q, k, v, mask, scale, keep_prob)
    stats = (row_max.expand(*row_max.shape[:-1], 8).contiguous(), row_sum.expand(*row_sum.shape[:-1], 8).contiguous())
    return _from_bnsd(out, input_layout), stats[0], stats[1], torch.empty(0), 0, 0, 0


def _varlen(query, key, value, head_num, atten_mask, scale, keep_prob, actual_seq_qlen, actual_seq_kvlen,
            sparse_mode):
    if actual_seq_qlen is None or actual_seq_kvlen is None:
        raise RuntimeError("npu_fusion_attention: TND needs actual_seq_qlen and actual_seq_kvlen")
    if not all(isinstance(x, int) for x in list(actual_seq_qlen) + list(actual_seq_kvlen)):
        raise TypeError("npu_fusion_attention: actual_seq_qlen/kvlen must be lists of int (host values)")
    if len(actual_seq_qlen) != len(actual_seq_kvlen):
        raise RuntimeError("npu_fusion_attention: actual_seq_qlen and actual_seq_kvlen differ in length")
    if sparse_mode not in (2, 3):
        raise NotImplementedError(f"fake npu_fusion_attention: TND with sparse_mode={sparse_mode}")
    if query.dim() != 3 or query.shape[1] != head_num:
        raise RuntimeError(f"npu_fusion_attention: TND query {tuple(query.shape)} with head_num={head_num}")
    qs, ks = [0, *actual_seq_qlen], [0, *actual_seq_kvlen]
    if any(b < a for a, b in zip(qs, qs[1:])) or any(b < a for a, b in zip(ks, ks[1:])):
        raise RuntimeError("npu_fusion_attention: actual_seq_qlen/kvlen must be cumulative (non-decreasing)")
    if qs[-1] != query.shape[0] or ks[-1] != key.shape[0]:
        raise RuntimeError(f"npu_fusion_attention: cumulative lengths end at {qs[-1]}/{ks[-1]}, tensors hold "
                           f"{query.shape[0]}/{key.shape[0]} tokens")
    outs, maxes, sums = [], [], []
    for q0, q1, k0, k1 in zip(qs, qs[1:], ks, ks[1:]):
        q = query[q0:q1].transpose(0, 1)[None]
        k = key[k0:k1].transpose(0, 1)[None]
        v = value[k0:k1].transpose(0, 1)[None]
        mask = _mask_for(sparse_mode, atten_mask, q1 - q0, k1 - k0, 0, 0, query.device)
        out, row_max, row_sum = _attend(q, k, v, mask, scale, keep_prob)
        outs.append(out[0].transpose(0, 1))
        maxes.append(row_max[0].transpose(0, 1).expand(-1, -1, 8))
        sums.append(row_sum[0].transpose(0, 1).expand(-1, -1, 8))
    return torch.cat(outs), torch.cat(maxes).contiguous(), torch.cat(sums).contiguous(), torch.empty(0), 0, 0, 0


# Fused collective + matmul ops for tensor parallelism (npu_all_gather_base_mm, npu_mm_reduce_scatter_base).
# Source: the torch_npu API reference (Ascend op-plugin docs). The real ops take an HCCL communicator name; here
# the name is one handed out by fake_hccl_comm_name(group) (a test helper, not part of torch_npu), and the
# collective runs through torch.distributed on that group (gloo in CPU tests).
_FAKE_HCOM_GROUPS: dict = {}


def fake_hccl_comm_name(group) -> str:
    """Test helper standing in for ProcessGroupHCCL.get_hccl_comm_name: a name the fused ops below resolve."""
    name = f"fake_hcom_{id(group)}"
    _FAKE_HCOM_GROUPS[name] = group
    return name


def _check_collective_mm(op: str, x1: torch.Tensor, x2: torch.Tensor, hcom: str, world_size: int, bias,
                         comm_turn: int):
    if x1.dim() != 2 or x2.dim() != 2:
        raise RuntimeError(f"{op}: inputs must be 2-D, got {tuple(x1.shape)} and {tuple(x2.shape)}")
    if x1.dtype not in (torch.float16, torch.bfloat16) or x2.dtype != x1.dtype:
        raise TypeError(f"{op}: dtypes {x1.dtype}/{x2.dtype}; expected float16 or bfloat16, both the same")
    if x1.shape[1] != x2.shape[0]:
        raise RuntimeError(f"{op}: k of {tuple(x1.shape)} and {tuple(x2.shape)} differ")
    if not 256 <= x1.shape[1] < 65535:
        raise RuntimeError(f"{op}: k={x1.shape[1]} outside [256, 65535)")
    if not x1.is_contiguous():
        raise RuntimeError(f"{op}: the first input must not be a transposed (non-contiguous) tensor")
    if world_size not in (2, 4, 8):
        raise RuntimeError(f"{op}: world_size {world_size}; Atlas A2 supports 2, 4, 8")
    if bias is not None:
        raise RuntimeError(f"{op}: bias is not supported")
    if comm_turn != 0:
        raise RuntimeError(f"{op}: comm_turn must be 0")
    if hcom not in _FAKE_HCOM_GROUPS:
        raise RuntimeError(f"{op}: unknown communicator {hcom!r}")
    group = _FAKE_HCOM_GROUPS[hcom]
    if torch.distributed.get_world_size(group) != world_size:
        raise RuntimeError(f"{op}: world_size {world_size} != size of communicator {hcom!r}")
    return group


def npu_all_gather_base_mm(input, x2, hcom, world_size, *, bias=None, gather_index=0,  # noqa: A002
                           gather_output=True, comm_turn=0):
    """(allgather(input) @ x2, allgather(input)); input (m, k) gathered along dim 0 over the communicator."""
    group = _check_collective_mm("npu_all_gather_base_mm", input, x2, hcom, world_size, bias, comm_turn)
    if gather_index != 0:
        raise RuntimeError("npu_all_gather_base_mm: only gather_index=0 is supported")
    gathered = torch.empty((input.shape[0] * world_size, input.shape[1]), dtype=input.dtype)
    torch.distributed.all_gather_into_tensor(gathered, input, group=group)
    out = (gathered.float() @ x2.float()).to(input.dtype)
    return out, (gathered if gather_output else torch.empty(0, dtype=input.dtype))


def npu_mm_reduce_scatter_base(input, x2, hcom, world_size, *, reduce_op="sum", bias=None,  # noqa: A002
                               comm_turn=0):
    """reducescatter(input @ x2) along dim 0; m must divide by world_size."""
    group = _check_collective_mm("npu_mm_reduce_scatter_base", input, x2, hcom, world_size, bias, comm_turn)
    if reduce_op != "sum":
        raise RuntimeError("npu_mm_reduce_scatter_base: only reduce_op='sum' is supported")
    if input.shape[0] % world_size:
        raise RuntimeError(f"npu_mm_reduce_scatter_base: m={input.shape[0]} not divisible by {world_size}")
    partial = input.float() @ x2.float()
    out = torch.empty((input.shape[0] // world_size, x2.shape[1]), dtype=torch.float32)
    torch.distributed.reduce_scatter_tensor(out, partial, group=group)
    return out.to(input.dtype)


class _FakeProfilerModule:
    """``torch_npu.profiler``: profile(activities=, on_trace_ready=, record_shapes=, profile_memory=) with
    start()/stop(); on_trace_ready(prof) runs at stop, and tensorboard_trace_handler(dir) writes a
    ``*_ascend_pt`` directory under dir, as the documentation describes."""

    class ProfilerActivity:
        CPU = "CPU"
        NPU = "NPU"

    class profile:  # noqa: N801 - torch_npu's name
        def __init__(self, activities=None, schedule=None, on_trace_ready=None, record_shapes=False,
                     profile_memory=False, with_stack=False, with_flops=False, with_modules=False,
                     experimental_config=None):
            valid = {_FakeProfilerModule.ProfilerActivity.CPU, _FakeProfilerModule.ProfilerActivity.NPU}
            if activities is not None and not set(activities) <= valid:
                raise ValueError(f"torch_npu.profiler.profile: unknown activities {activities}")
            self.activities = list(activities or valid)
            self.on_trace_ready = on_trace_ready
            self.record_shapes, self.profile_memory = record_shapes, profile_memory
            self.running = False

        def start(self):
            if self.running:
                raise RuntimeError("profiler already started")
            self.running = True

        def stop(self):
            if not self.running:
                raise RuntimeError("profiler not started")
            self.running = False
            if self.on_trace_ready is not None:
                self.on_trace_ready(self)

    @staticmethod
    def tensorboard_trace_handler(dir_name, worker_name=None, analyse_flag=True):
        import os

        def handler(prof):
            out = os.path.join(dir_name, f"{worker_name or 'fake'}_ascend_pt")
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "activities.txt"), "w") as f:
                f.write(",".join(prof.activities))

        return handler


profiler = _FakeProfilerModule
