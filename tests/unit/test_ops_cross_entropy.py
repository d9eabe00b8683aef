"""fused_linear_cross_entropy (chunked) against torch's cross_entropy on the full logits: per-token loss with
ignore_index -100, gradients of hidden and weight (trainable and frozen weight), any chunk size, and a check
that no fp32 tensor as large as the full logits is ever allocated.

``force_impl="npu"`` runs the chunked implementation in torch ops on CPU tensors (its CUDA variant differs only in
two Triton passes per chunk; tests/gpu covers it). Tolerances: fp32 1e-5;
bf16 (inputs bf16, loss fp32) 2e-2 relative.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mindspeed_lora.ops.cross_entropy import fused_linear_cross_entropy

S, B, H, V = 9, 3, 32, 200


def inputs(dtype=torch.float32, weight_grad=True, seed=0, hidden_size=H):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(S, B, hidden_size, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, hidden_size, generator=g) * 0.3).to(dtype).requires_grad_(weight_grad)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, :4] = -100
    labels[2, -1] = -100
    return hidden, weight, labels


def oracle(hidden, weight, labels):
    logits = (hidden @ weight.t()).float()  # [s, b, v]
    return F.cross_entropy(logits.permute(1, 2, 0), labels, ignore_index=-100, reduction="none")  # [b, s]


def loss_and_grads(fn, hidden, weight, labels):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_(weight.requires_grad)
    loss = fn(h, w, labels)
    upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(5))
    (loss * upstream).sum().backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("weight_grad", [True, False])
@pytest.mark.parametrize("chunk_size", [None, 1, 4, S * B + 5])
def test_chunked_matches_full_logits_cross_entropy(weight_grad, chunk_size):
    hidden, weight, labels = inputs(weight_grad=weight_grad)
    loss, dh, dw = loss_and_grads(
        lambda h, w, y: fused_linear_cross_entropy(h, w, y, tp_group=None, chunk_size=chunk_size, force_impl="npu"),
        hidden, weight, labels)
    ref_loss, ref_dh, ref_dw = loss_and_grads(oracle, hidden, weight, labels)
    assert loss.shape == (B, S) and loss.dtype == torch.float32
    assert torch.all(loss[labels == -100] == 0) and torch.all(loss[labels != -100] > 0)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dh, ref_dh, atol=1e-5, rtol=1e-5)
    assert torch.all(dh.transpose(0, 1)[labels == -100] == 0)
    if weight_grad:
        torch.testing.assert_close(dw, ref_dw, atol=1e-5, rtol=1e-5)
    else:
        assert dw is None


def test_reference_impl_matches_oracle():
    hidden, weight, labels = inputs()
    got = loss_and_grads(lambda h, w, y: fused_linear_cross_entropy(h, w, y, tp_group=None, force_impl="reference"),
                         hidden, weight, labels)
    for a, b in zip(got, loss_and_grads(oracle, hidden, weight, labels)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_bf16_matches_oracle_within_bf16_tolerance():
    hidden, weight, labels = inputs(dtype=torch.bfloat16)
    got = loss_and_grads(lambda h, w, y: fused_linear_cross_entropy(h, w, y, tp_group=None, chunk_size=5,
                                                                     force_impl="npu"), hidden, weight, labels)
    for a, b in zip(got, loss_and_grads(oracle, hidden, weight, labels)):
        scale = b.float().abs().max()
        assert (a.float() - b.float()).abs().max() <= 2e-2 * scale


class _LargestFloatAllocation(TorchDispatchMode):
    """Records the largest fp32 tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("weight_grad", [True, False])
def test_full_fp32_logits_never_exist(weight_grad):
    h = 16  # small enough that the fp32 weight-grad accumulator [V, h] is smaller than the full logits
    hidden, weight, labels = inputs(dtype=torch.bfloat16, weight_grad=weight_grad, hidden_size=h)
    chunk = 4
    with _LargestFloatAllocation() as probe:
        loss = fused_linear_cross_entropy(hidden, weight, labels, tp_group=None, chunk_size=chunk, force_impl="npu")
        loss.sum().backward()
    assert probe.largest <= max(chunk * V, V * h)  # one chunk's logits, or the fp32 weight-grad accumulator
    assert probe.largest < S * B * V


def test_shape_errors():
    hidden, weight, labels = inputs()
    with pytest.raises(ValueError, match=r"labels \[b, s\]"):
        fused_linear_cross_entropy(hidden, weight, labels.t(), tp_group=None)
    with pytest.raises(ValueError, match="weight"):
        fused_linear_cross_entropy(hidden, weight[:, :-1], labels, tp_group=None)
