"""CCLoRA at TP=1 in a whole model, what it refuses, and that adapter reads go through module calls (hooks).

The multi-rank cases are in tests/distributed/checks_cclora.py; the oracle here is the unfused LoRA model.
"""
import pytest
import torch

from mindspeed_lora import tiny
from mindspeed_lora.checkpoint.hf_reader import HFCheckpointReader
from mindspeed_lora.checkpoint.weight_map import load_hf_weights
from mindspeed_lora.errors import UserError
from mindspeed_lora.models.arch import ModelArch
from mindspeed_lora.models.builder import ModelOptions, ParallelOptions, build_gpt_model
from mindspeed_lora.models.family import read_hf_config
from tests import lora_fixtures as fx


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from mindspeed_lora.parallel import initialize

    initialize(1, 1, seed=5)
    path = str(tmp_path_factory.mktemp("cclora_hf"))
    tiny.build_hf_model("qwen2", path, seed=3)
    return path


def _model(hf_dir, fusion, adapters=None):
    from mindspeed_lora.lora import LoraConfig, lora_spec_hook, prepare_lora_model

    arch = ModelArch.from_hf_config(read_hf_config(hf_dir))
    cfg = LoraConfig(r=fx.R, alpha=fx.ALPHA, target_modules=["all-linear"], fusion=fusion)
    model = build_gpt_model(arch, ParallelOptions(), ModelOptions(spec_hooks=[lora_spec_hook(cfg)]),
                            pre_process=True, post_process=True)
    load_hf_weights(model, HFCheckpointReader(hf_dir), arch, ParallelOptions(), 0, 0)
    prepare_lora_model(model, seed=1)
    if adapters is not None:
        fx.load_adapters(model, adapters, 0, 1, 0)
    return model, arch


@pytest.mark.parametrize("seq", [4, 64])  # tokens below and above hidden (64): both sides of the weight merge
def test_fused_model_equals_unfused_at_tp1(hf_dir, seq):
    ref = fx.peft_model(hf_dir, seed=2)
    arch = ModelArch.from_hf_config(read_hf_config(hf_dir))
    adapters = fx.peft_full(ref, arch)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (2, seq), generator=gen)
    labels = torch.randint(0, 512, (2, seq), generator=gen)
    pos = torch.arange(seq).unsqueeze(0).expand(2, -1)
    runs = []
    for fusion in (False, True):
        model, _ = _model(hf_dir, fusion, adapters)
        loss = model(ids, pos, None, labels=labels).mean()
        loss.backward()
        runs.append((loss.detach(), fx.gather_full(model, 0, grads=True)))
        assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)
    (l0, g0), (l1, g1) = runs
    assert abs(l1 - l0) <= 1e-6 * abs(l0)
    for k in g0:
        assert fx.rel(g1[k], g0[k]) < 1e-5, k


@pytest.mark.parametrize("fusion", [False, True])
def test_adapter_weights_are_read_through_module_calls(hf_dir, fusion):
    """megatron's DDP waits for an overlapped param all-gather in forward pre-hooks of the module owning the
    param; every adapter module must therefore be called once per forward."""
    model, _ = _model(hf_dir, fusion)
    calls = {}
    for name, mod in model.named_modules():
        if name.endswith((".lora_A.default", ".lora_B.default")):
            mod.register_forward_pre_hook(lambda m, args, n=name: calls.__setitem__(n, calls.get(n, 0) + 1))
    assert len(calls) == 0
    ids = torch.randint(0, 512, (1, 8))
    model(ids, torch.arange(8)[None], None)
    assert len(calls) == 2 * 4 * 2 and set(calls.values()) == {1}


def test_refuses_a_trainable_base_weight(hf_dir):
    model, _ = _model(hf_dir, fusion=True)
    model.decoder.layers[0].mlp.linear_fc2.base_layer.weight.requires_grad_(True)
    ids = torch.randint(0, 512, (1, 8))
    with pytest.raises(UserError, match="base weight"):
        model(ids, torch.arange(8)[None], None)


def test_collectives_choice():
    from megatron.core import parallel_state as ps

    from mindspeed_lora.lora.cclora import GenericCollectives, collectives_for

    group = ps.get_tensor_model_parallel_group()
    assert type(collectives_for(group, "cpu")) is GenericCollectives
    assert type(collectives_for(group, "npu", force_impl="generic")) is GenericCollectives
    with pytest.raises(ValueError, match="force_impl"):
        collectives_for(group, "cpu", force_impl="cuda")
