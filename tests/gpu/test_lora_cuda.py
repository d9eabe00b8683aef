"""The TP=1 fused LoRA linear on a CUDA GPU: bf16 adapter grads accumulated by cuBLAS straight into megatron's
fp32 main_grad (``torch.addmm(..., out_dtype=float32)``) equal the fp64 reference."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("main_dtype", [torch.float32, torch.bfloat16])
def test_adapter_grads_accumulate_into_main_grad_on_cuda(main_dtype):
    from mindspeed_lora.lora.layers import FrozenBaseLoraFunction

    g = torch.Generator(device="cuda").manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    w = torch.randn(1536, 1024, generator=g, device=dev).to(bf)
    a = torch.randn(8, 1024, generator=g, device=dev).to(bf).requires_grad_()
    b = torch.randn(1536, 8, generator=g, device=dev).to(bf).requires_grad_()
    for p in (a, b):
        p.main_grad = torch.zeros(p.shape, dtype=main_dtype, device=dev)
        p.grad_added_to_main_grad = False
    want = {id(a): torch.zeros(a.shape, dtype=torch.float64, device=dev),
            id(b): torch.zeros(b.shape, dtype=torch.float64, device=dev)}
    for _ in range(3):  # micro-batches
        x = torch.randn(2048, 1024, generator=g, device=dev).to(bf).requires_grad_()
        grad = torch.randn(2048, 1536, generator=g, device=dev).to(bf)
        y = FrozenBaseLoraFunction.apply(x, None, w, a, b, 2.0)
        y.backward(grad)
        a.grad = b.grad = None
        xd, gd, ad, bd, wd = (t.detach().double() for t in (x, grad, a, b, w))
        assert (y.double() - (xd @ wd.t() + 2.0 * (xd @ ad.t()) @ bd.t())).abs().max() <= 2e-2 * y.abs().max()
        assert (x.grad.double() - (gd @ wd + 2.0 * (gd @ bd) @ ad)).abs().max() <= 2e-2 * x.grad.abs().max()
        want[id(b)] += 2.0 * gd.t() @ (xd @ ad.t())
        want[id(a)] += 2.0 * (gd @ bd).t() @ xd
    for p in (a, b):
        assert p.grad_added_to_main_grad and p.main_grad.dtype == main_dtype
        err = (p.main_grad.double() - want[id(p)]).abs().max() / want[id(p)].abs().max()
        # fp32 accumulator: only the bf16 operands' rounding (a = x·Aᵀ is kept in bf16); bf16: its own rounding too
        assert err <= (2e-3 if main_dtype == torch.float32 else 1e-2), (p.shape, err.item())


def test_cclora_at_tp1_on_cuda_takes_the_fused_base_path():
    """--lora-fusion at TP=1 on CUDA: the one-device fused linear (the merged-weight rule was 0.89x of it), equal
    to the unfused layer."""
    from mindspeed_lora.lora import LoraColumnParallelLinear, LoraConfig
    from mindspeed_lora.parallel import initialize
    from tests.distributed.checks_cclora import _config

    initialize(1, 1, seed=3)
    g = torch.Generator(device="cuda").manual_seed(1)
    w = torch.randn(384, 256, generator=g, device="cuda").bfloat16()
    a = torch.randn(8, 256, generator=g, device="cuda").bfloat16()
    b = torch.randn(384, 8, generator=g, device="cuda").bfloat16()
    x = torch.randn(512, 2, 256, generator=g, device="cuda").bfloat16()  # tokens >= in: the merged rule's side
    grad = torch.randn(512, 2, 384, generator=g, device="cuda").bfloat16()
    results = []
    for fusion in (False, True):
        cfg = LoraConfig(r=8, alpha=16, target_modules=["all-linear"], fusion=fusion)
        layer = LoraColumnParallelLinear(256, 384, lora_config=cfg, config=_config(1, False, torch.bfloat16),
                                         init_method=lambda t: None, bias=False, gather_output=False).cuda()
        with torch.no_grad():
            layer.base_layer.weight.copy_(w)
            layer.lora_a.copy_(a)
            layer.lora_b.copy_(b)
        xi = x.clone().requires_grad_()
        out, _ = layer(xi)
        assert type(out.grad_fn).__name__.startswith("FrozenBaseLoraFunction"), out.grad_fn
        out.backward(grad)
        results.append((out, xi.grad, layer.lora_a.grad, layer.lora_b.grad))
    for ref, got in zip(*results):
        assert torch.equal(ref, got)
