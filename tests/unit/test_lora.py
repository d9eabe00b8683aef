"""LoRA layers at TP=1 against peft on the same HF model, plus the model-level helpers (spec hook, init,
freezing, adapter state dict, first-stage input grad under full recompute).

Oracle: HF transformers + peft LoRA on q,k,v,o,gate,up,down with random nonzero B (tests/lora_fixtures.py).
"""
import pytest
import torch
import torch.nn.functional as F

from mindspeed_lora import tiny
from mindspeed_lora.checkpoint.hf_reader import HFCheckpointReader
from mindspeed_lora.checkpoint.weight_map import load_hf_weights
from mindspeed_lora.errors import UserError
from mindspeed_lora.models.arch import ModelArch
from mindspeed_lora.models.builder import ModelOptions, ParallelOptions, build_gpt_model
from mindspeed_lora.models.family import read_hf_config
from tests import lora_fixtures as fx

SEQ, BATCH = 12, 2
ALL = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from mindspeed_lora.parallel import initialize

    initialize(1, 1, seed=5)
    path = str(tmp_path_factory.mktemp("lora_hf"))
    tiny.build_hf_model("qwen3", path, seed=13)
    return path


def _cfg(**kw):
    from mindspeed_lora.lora import LoraConfig

    return LoraConfig(**{"r": fx.R, "alpha": fx.ALPHA, "target_modules": ALL, **kw})


def _ours(hf_dir, cfg, recompute=None, load=True, method=None):
    from mindspeed_lora.lora import lora_spec_hook

    arch = ModelArch.from_hf_config(read_hf_config(hf_dir))
    par = ParallelOptions()
    options = ModelOptions(spec_hooks=[lora_spec_hook(cfg)], recompute_granularity=recompute,
                           recompute_method=method)
    model = build_gpt_model(arch, par, options, pre_process=True, post_process=True)
    if load:
        load_hf_weights(model, HFCheckpointReader(hf_dir), arch, par, 0, 0)
    return model, arch


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 512, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, 512, (BATCH, SEQ), generator=g)
    return ids, labels


def _pos():
    return torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1)


def test_logits_and_adapter_grads_equal_peft(hf_dir):
    from mindspeed_lora.lora import mark_only_lora_trainable

    ref = fx.peft_model(hf_dir, seed=1)
    model, arch = _ours(hf_dir, _cfg())
    assert fx.load_adapters(model, fx.peft_full(ref, arch), 0, 1, 0) == 2 * 4 * arch.num_layers
    mark_only_lora_trainable(model)
    ids, labels = _inputs()

    ref_logits = ref(input_ids=ids).logits
    F.cross_entropy(ref_logits.flatten(0, 1), labels.flatten()).backward()
    logits = model(ids, _pos(), None)
    F.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()

    diff = (logits - ref_logits).abs().max().item()
    assert diff < 1e-5, f"max |logit diff| vs peft {diff:.2e}"
    ref_grads = fx.peft_full(ref, arch, grads=True)
    ours = fx.gather_full(model, 0, grads=True)
    assert set(ours) == set(ref_grads)
    for k, g in ours.items():
        err = fx.rel(g, ref_grads[k])
        assert err < 1e-5, f"grad of {k} differs from peft's by {err:.2e} (relative)"
    # the adapters matter: with B zeroed the model is the base model, whose logits differ
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.zero_()
        plain = model(ids, _pos(), None)
    with ref.disable_adapter(), torch.no_grad():
        assert (plain - ref(input_ids=ids).logits).abs().max() < 1e-5
    assert (plain - logits).abs().max() > 1e-2


def test_state_dict_keys_and_frozen_base(hf_dir):
    from mindspeed_lora.lora import adapter_state_dict, lora_parameters, mark_only_lora_trainable

    model, arch = _ours(hf_dir, _cfg(target_modules=["linear_qkv", "linear_fc2"]))
    n = mark_only_lora_trainable(model)
    keys = set(model.state_dict())
    p = "decoder.layers.0."
    for k in ("self_attention.linear_qkv.base_layer.weight", "self_attention.linear_qkv.lora_A.default.weight",
              "self_attention.linear_qkv.lora_B.default.weight", "mlp.linear_fc2.base_layer.weight",
              "mlp.linear_fc2.lora_A.default.weight", "mlp.linear_fc2.lora_B.default.weight",
              "self_attention.linear_proj.weight", "mlp.linear_fc1.weight"):
        assert p + k in keys, k
    adapters = adapter_state_dict(model)
    assert sorted(adapters) == sorted(k for k in keys if ".lora_" in k)
    assert len(adapters) == 2 * 2 * arch.num_layers
    trainable = [q for q in model.parameters() if q.requires_grad]
    assert {id(q) for q in trainable} == {id(q) for q in lora_parameters(model)}
    assert n == sum(q.numel() for q in trainable)
    h, ffn, r = arch.hidden_size, arch.ffn_hidden_size, fx.R
    qkv_out = (arch.num_attention_heads + 2 * arch.num_query_groups) * arch.kv_channels
    assert n == arch.num_layers * (r * h + qkv_out * r + r * ffn + h * r)
    qkv = model.decoder.layers[0].self_attention.linear_qkv
    assert qkv.weight is qkv.base_layer.weight and not qkv.weight.requires_grad
    assert tuple(qkv.lora_A["default"].weight.shape) == (r, h)
    assert tuple(qkv.lora_B["default"].weight.shape) == (qkv_out, r)


def test_base_gets_no_grad_and_dropout_free_path_has_no_dropout(hf_dir):
    from mindspeed_lora.lora import mark_only_lora_trainable

    model, _ = _ours(hf_dir, _cfg())
    mark_only_lora_trainable(model)
    fc1 = model.decoder.layers[0].mlp.linear_fc1
    assert fc1.lora_dropout is None
    ids, labels = _inputs()
    model(ids, _pos(), None, labels=labels).mean().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)
    assert fc1.lora_A["default"].weight.grad is not None


def test_dropout_is_applied_to_the_lora_input_only(hf_dir):
    model, _ = _ours(hf_dir, _cfg(dropout=0.5), load=False)
    fc2 = model.decoder.layers[0].mlp.linear_fc2
    x = torch.randn(SEQ, BATCH, fc2.input_size)
    with torch.no_grad():
        fc2.lora_b.normal_()
        base, _ = fc2.base_layer(x)
        fc2.eval()
        ev = fc2(x)[0]
        fc2.train()
        torch.manual_seed(3)
        tr = fc2(x)[0]
        torch.manual_seed(3)
        mask = F.dropout(torch.ones_like(x), 0.5, training=True)
    expected_eval = base + fc2.scaling * (x @ fc2.lora_a.T) @ fc2.lora_b.T
    expected_train = base + fc2.scaling * ((x * mask) @ fc2.lora_a.T) @ fc2.lora_b.T
    assert torch.allclose(ev, expected_eval, atol=1e-5)
    assert torch.allclose(tr, expected_train, atol=1e-5)
    assert not torch.allclose(tr, ev, atol=1e-3)


def test_init_depends_on_seed_and_global_name_not_on_build(hf_dir):
    from mindspeed_lora.lora import init_lora_parameters, lora_modules

    a, _ = _ours(hf_dir, _cfg(), load=False)
    torch.manual_seed(99)  # a different global RNG state while building must not matter
    b, _ = _ours(hf_dir, _cfg(), load=False)
    assert init_lora_parameters(a, 7) == init_lora_parameters(b, 7) == 8
    sa, sb = dict(a.named_parameters()), dict(b.named_parameters())
    lora_keys = [k for k in sa if ".lora_" in k]
    for k in lora_keys:
        assert torch.equal(sa[k], sb[k]), k
        if ".lora_B." in k:
            assert not sa[k].any(), k
    names = [n for n, _ in lora_modules(a)]
    assert "decoder.layers.1.self_attention.linear_qkv" in names and len(set(names)) == 8
    qkv0 = sa["decoder.layers.0.self_attention.linear_qkv.lora_A.default.weight"]
    qkv1 = sa["decoder.layers.1.self_attention.linear_qkv.lora_A.default.weight"]
    assert not torch.equal(qkv0, qkv1)
    bound = 1 / qkv0.shape[1] ** 0.5  # kaiming-uniform(a=sqrt(5)) over fan-in = U(-1/sqrt(in), 1/sqrt(in))
    assert qkv0.abs().max() <= bound and qkv0.abs().max() > 0.9 * bound
    init_lora_parameters(b, 8)
    assert not torch.equal(qkv0, dict(b.named_parameters())[
        "decoder.layers.0.self_attention.linear_qkv.lora_A.default.weight"])


def test_full_recompute_first_stage_adapters_get_grads_only_with_the_input_grad_hook(hf_dir):
    from mindspeed_lora.lora import prepare_lora_model

    ids, labels = _inputs()
    grads = {}
    for with_hook in (False, True):
        model, _ = _ours(hf_dir, _cfg(), recompute="full")
        handle = prepare_lora_model(model, seed=3)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".lora_B." in n:
                    p.normal_(0, 0.1)
        if not with_hook:
            handle.remove()
        loss = model(ids, _pos(), None, labels=labels).mean()
        if loss.requires_grad:
            loss.backward()
        grads[with_hook] = {n: p.grad for n, p in model.named_parameters() if ".lora_" in n}
    assert all(g is None for g in grads[False].values()), "expected the trap: no grads without the hook"
    assert all(g is not None and g.abs().sum() > 0 for g in grads[True].values())


def test_spec_hook_refuses_a_non_megatron_linear_and_expert_layers():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from mindspeed_lora.lora import LoraColumnParallelLinear, lora_spec_hook

    spec = get_gpt_layer_local_spec()
    spec.submodules.mlp.submodules.linear_fc1 = torch.nn.Linear
    with pytest.raises(UserError, match="linear_fc1.*Linear"):
        lora_spec_hook(_cfg())(spec, None, None)
    out = lora_spec_hook(_cfg(target_modules=["linear_qkv"]))(get_gpt_layer_local_spec(), None, None)
    assert out.submodules.self_attention.submodules.linear_qkv.module is LoraColumnParallelLinear
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, use_cpu_initialization=True)
    with pytest.raises(UserError, match="expert"):
        LoraColumnParallelLinear(8, 8, lora_config=_cfg(), config=config, init_method=lambda w: None,
                                 bias=False, gather_output=False, is_expert=True)


def test_lora_config_reaches_every_layer(hf_dir):
    model, _ = _ours(hf_dir, _cfg(r=2, alpha=6, use_rslora=True), load=False)
    mods = [m for n, m in model.named_modules() if n.endswith(("linear_qkv", "linear_fc2"))]
    assert mods and all(abs(m.scaling - 6 / 2 ** 0.5) < 1e-12 for m in mods)


@pytest.mark.parametrize("output_unused", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("x_needs_grad", [True, False])
def test_frozen_base_lora_function_equals_base_plus_adapter(dropout, x_needs_grad, output_unused):
    from mindspeed_lora.lora.layers import FrozenBaseLoraFunction

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 16, generator=g, dtype=torch.float64).requires_grad_(x_needs_grad)
    w = torch.randn(24, 16, generator=g, dtype=torch.float64)
    a = torch.randn(4, 16, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(24, 4, generator=g, dtype=torch.float64).requires_grad_()
    mask = (torch.rand(5, 3, 16, generator=g) > 0.3).double() / 0.7 if dropout else None
    grad = torch.randn(5, 3, 24, generator=g, dtype=torch.float64)

    def run(fused):
        xs = [t.detach().clone().requires_grad_(t.requires_grad) for t in (x, a, b)]
        x_l = xs[0] * mask if dropout else None
        if fused:
            y = FrozenBaseLoraFunction.apply(xs[0], x_l, w, xs[1], xs[2], 0.75, output_unused)
        else:
            y = F.linear(xs[0], w) + 0.75 * F.linear(F.linear(xs[0] if x_l is None else x_l, xs[1]), xs[2])
        y.backward(grad)
        return y.detach(), [t.grad for t in xs]

    y_f, grads_f = run(True)
    y_r, grads_r = run(False)
    if not output_unused:  # else only the backward is defined (a recomputation that discards the value)
        assert torch.allclose(y_f, y_r, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads_f, grads_r):
        assert (got is None) == (want is None)
        if want is not None:
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("main_dtype", [torch.float32, torch.bfloat16])
def test_frozen_base_lora_function_accumulates_adapter_grads_into_megatron_main_grad(main_dtype):
    """With megatron DDP's main_grad on the adapter params, two micro-batches' grads land in main_grad (fp32 or
    bf16), autograd gets a placeholder and grad_added_to_main_grad tells DDP's hook to skip its add."""
    from mindspeed_lora.lora.layers import FrozenBaseLoraFunction

    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 16, generator=g).bfloat16()
    a = torch.randn(4, 16, generator=g).bfloat16().requires_grad_()
    b = torch.randn(24, 4, generator=g).bfloat16().requires_grad_()
    xs = [torch.randn(6, 16, generator=g).bfloat16() for _ in range(2)]
    grads = [torch.randn(6, 24, generator=g).bfloat16() for _ in range(2)]
    for p in (a, b):
        p.main_grad = torch.zeros(p.shape, dtype=main_dtype)
        p.grad_added_to_main_grad = False
    want_a, want_b = torch.zeros(a.shape, dtype=torch.float64), torch.zeros(b.shape, dtype=torch.float64)
    for x, grad in zip(xs, grads):
        FrozenBaseLoraFunction.apply(x, None, w, a, b, 0.5).backward(grad)
        assert a.grad is not None and b.grad is not None  # the placeholders megatron's hook expects
        a.grad = b.grad = None
        xd, gd, bd = x.double(), grad.double(), b.detach().double()
        want_b += 0.5 * gd.t() @ (xd @ a.detach().double().t())
        want_a += 0.5 * (gd @ bd).t() @ xd
    assert a.grad_added_to_main_grad and b.grad_added_to_main_grad
    for p, want in ((a, want_a), (b, want_b)):
        assert p.main_grad.dtype == main_dtype
        tol = 1e-2 * want.abs().max()  # bf16 products (and a bf16 accumulator in the second case)
        assert (p.main_grad.double() - want).abs().max() <= tol, p.shape


def test_one_rank_lora_linears_take_the_fused_base_path(hf_dir):
    model, _ = _ours(hf_dir, _cfg())
    for layer in model.decoder.layers:
        for lin in (layer.self_attention.linear_qkv, layer.self_attention.linear_proj, layer.mlp.linear_fc1,
                    layer.mlp.linear_fc2):
            assert lin._fused_base_applies()


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_split_recompute_equals_no_recompute_and_skips_the_output_projection_gemms(hf_dir, monkeypatch, dropout):
    from mindspeed_lora.lora import layers, prepare_lora_model

    ids, labels = _inputs()
    results = {}
    calls = []
    original = layers.FrozenBaseLoraFunction.forward

    def counted(ctx, *args):
        calls.append(bool(args[6]) if len(args) > 6 else False)
        return original(ctx, *args)

    monkeypatch.setattr(layers.FrozenBaseLoraFunction, "forward", staticmethod(counted))
    for method in (None, "split"):
        model, _ = _ours(hf_dir, _cfg(dropout=dropout), recompute="full" if method else None, method=method)
        prepare_lora_model(model, seed=3)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".lora_B." in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        model.train()
        torch.manual_seed(11)
        calls.clear()
        loss = model(ids, _pos(), None, labels=labels).mean()
        forward_calls = list(calls)
        loss.backward()
        results[method] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if ".lora_" in n})
        if method == "split":
            layers_n = len(model.decoder.layers)
            assert type(model.decoder.layers[0]).__name__ == "SplitRecomputeTransformerLayer"
            # forward: the 4 LoRA linears of every layer in full; recomputation: linear_qkv and linear_fc1 in
            # full, linear_proj and linear_fc2 without their output GEMMs (base and adapter)
            assert forward_calls == [False] * (4 * layers_n), forward_calls
            recomputed = calls[len(forward_calls):]
            assert sorted(recomputed) == [False] * (2 * layers_n) + [True] * (2 * layers_n), recomputed
    loss_ref, grads_ref = results[None]
    loss_split, grads_split = results["split"]
    assert torch.equal(loss_ref, loss_split)
    assert grads_ref.keys() == grads_split.keys()
    for n, g in grads_ref.items():
        assert g is not None and torch.allclose(grads_split[n], g, rtol=1e-6, atol=1e-7), n


def test_split_recompute_needs_full_granularity_and_takes_no_layer_count():
    from mindspeed_lora.training.config import ModelSetup

    with pytest.raises(UserError, match="drop --recompute-num-layers"):
        ModelSetup(load="x", recompute_granularity="full", recompute_method="split", recompute_num_layers=2)
    with pytest.raises(UserError, match="need --recompute-granularity full"):
        ModelSetup(load="x", recompute_method="split")
