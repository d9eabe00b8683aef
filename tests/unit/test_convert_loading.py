"""checkpoint.loading on models with LoRA-wrapped linears, built by hand from state-dict keys (no megatron).

A model here is a tree of modules whose ``state_dict`` has exactly the keys a megatron chunk with the LoRA
layers of the contract would have (``<linear>.base_layer.weight``, ``<linear>.lora_A.default.weight``, ...).
The oracle is the shard file itself: every parameter must equal the tensor saved under its key.
"""
import pytest
import torch
from torch import nn

from mindspeed_lora.checkpoint import loading
from mindspeed_lora.checkpoint.lora_layout import LoraCheckpointConfig
from mindspeed_lora.errors import UserError
from mindspeed_lora.models.builder import ParallelOptions
from tests.convert_fixtures import (
    arch_of,
    contract_shards,
    hf_tensors,
    megatron_shard,
    random_adapter,
    tiny_hf,
    write_lora_checkpoint,
)
from tests.unit.test_convert import run

PAR = ParallelOptions(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, num_layer_list=[1, 3])
LORA = LoraCheckpointConfig(r=4, alpha=8, target_modules=("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"))


def module_with(shapes: dict[str, tuple]) -> nn.Module:
    """A module tree whose state_dict keys are ``shapes``' keys, every parameter filled with NaN."""
    root = nn.Module()
    for key, shape in shapes.items():
        *path, leaf = key.split(".")
        m = root
        for part in path:
            if not hasattr(m, part):
                m.add_module(part, nn.Module())
            m = getattr(m, part)
        m.register_parameter(leaf, nn.Parameter(torch.full(shape, float("nan"))))
    return root


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("loading")
    hf_dir = str(root / "hf")
    tiny_hf("llama3", hf_dir, seed=3)
    run(hf_dir, root / "mg", target_tp=2, target_pp=2, num_layer_list=[1, 3])
    arch = arch_of(hf_dir)
    adapter = random_adapter(hf_tensors(hf_dir), arch, 4, seed=1)
    write_lora_checkpoint(str(root / "lora"), contract_shards(adapter, arch, 2, [1, 3]), arch, 2, [1, 3], 4, 8)
    return root, hf_dir, arch


def lora_model_keys(root, tp, pp):
    """{key: shape} of rank (tp, pp)'s chunk with every targeted linear LoRA-wrapped."""
    base = megatron_shard(str(root / "mg"), tp, pp, 2)["model"]
    adapters = megatron_shard(str(root / "lora"), tp, pp, 2)["model"]
    wrapped = {k.rsplit(".", 3)[0] for k in adapters}
    shapes = {(k[: -len(".weight")] + ".base_layer.weight" if k.rsplit(".", 1)[0] in wrapped else k): tuple(v.shape)
              for k, v in base.items()}
    shapes.update({k: tuple(v.shape) for k, v in adapters.items()})
    return shapes, base, adapters


def test_base_and_lora_weights_load_into_wrapped_linears(ckpts):
    root, hf_dir, arch = ckpts
    assert loading.resolve_arch(str(root / "mg")) == arch
    for tp, pp in ((1, 1), (0, 0)):
        shapes, base, adapters = lora_model_keys(root, tp, pp)
        model = module_with(shapes)
        loading.load_base_weights(model, str(root / "mg"), arch, PAR, tp, pp)
        loading.load_lora_weights(model, str(root / "lora"), LORA, PAR, tp, pp)
        state = model.state_dict()
        for key, t in base.items():
            wrapped = key[: -len(".weight")] + ".base_layer.weight"
            assert torch.equal(state[wrapped if wrapped in state else key], t), key
        for key, t in adapters.items():
            assert torch.equal(state[key], t), key


def test_hf_dir_loads_into_wrapped_linears(ckpts):
    root, hf_dir, arch = ckpts
    shapes, base, _ = lora_model_keys(root, 1, 0)
    model = module_with({k: v for k, v in shapes.items() if ".lora_" not in k})
    loading.load_base_weights(model, hf_dir, arch, PAR, 1, 0)
    state = model.state_dict()
    for key, t in base.items():
        wrapped = key[: -len(".weight")] + ".base_layer.weight"
        assert torch.equal(state[wrapped if wrapped in state else key], t), key


def test_lora_settings_must_match_the_checkpoint(ckpts):
    root, _, arch = ckpts
    shapes, _, _ = lora_model_keys(root, 0, 1)
    model = module_with(shapes)
    with pytest.raises(UserError, match="r 4 vs 8"):
        loading.load_lora_weights(model, str(root / "lora"), {"r": 8, "alpha": 8, "target_modules": ["all-linear"]},
                                  PAR, 0, 1)
    with pytest.raises(UserError, match="target_modules"):
        loading.load_lora_weights(model, str(root / "lora"), {"r": 4, "alpha": 8, "target_modules": ["linear_qkv"]},
                                  PAR, 0, 1)

    class TrainingSideConfig:  # what mindspeed_lora.lora.LoraConfig looks like to the loader
        r, alpha, dropout, use_rslora = 4, 16.0, 0.0, False
        target_modules = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]

    with pytest.raises(UserError, match="alpha 8 vs 16"):
        loading.load_lora_weights(model, str(root / "lora"), TrainingSideConfig(), PAR, 0, 1)
    loading.load_lora_weights(model, str(root / "lora"), None, PAR, 0, 1)  # None: the checkpoint's own


def test_layout_and_key_mismatches_are_named(ckpts):
    root, _, arch = ckpts
    shapes, _, _ = lora_model_keys(root, 0, 1)
    other = ParallelOptions(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, num_layer_list=[2, 2])
    with pytest.raises(UserError) as e:
        loading.load_base_weights(module_with(shapes), str(root / "mg"), arch, other, 0, 1)
    assert "layers per stage [1, 3]" in str(e.value) and "[2, 2]" in str(e.value)
    assert "--num-layer-list 2,2" in str(e.value)
    with pytest.raises(UserError, match="this run uses 1, 1"):
        loading.load_lora_weights(module_with(shapes), str(root / "lora"), LORA, ParallelOptions(), 0, 0)
    missing = dict(shapes)
    missing.pop("decoder.layers.2.mlp.linear_fc2.base_layer.weight")
    with pytest.raises(UserError, match="'decoder.layers.2.mlp.linear_fc2.weight' is not in the model"):
        loading.load_base_weights(module_with(missing), str(root / "mg"), arch, PAR, 0, 1)
    extra = dict(shapes, **{"decoder.layers.2.mlp.router.weight": (2, 2)})
    with pytest.raises(UserError, match="no tensor 'decoder.layers.2.mlp.router.weight', which the model has"):
        loading.load_base_weights(module_with(extra), str(root / "mg"), arch, PAR, 0, 1)
    wrong = dict(shapes, **{"decoder.layers.0.mlp.linear_fc1.lora_B.default.weight": (5, 4)})
    with pytest.raises(UserError, match="linear_fc1.lora_B.default.weight has shape"):
        loading.load_lora_weights(module_with(wrong), str(root / "lora"), LORA, PAR, 0, 1)
    with pytest.raises(UserError, match="no LoRA layers"):
        loading.load_lora_weights(module_with({k: v for k, v in shapes.items() if ".lora_" not in k}),
                                  str(root / "lora"), LORA, PAR, 0, 1)
    with pytest.raises(UserError, match="holds LoRA tensors only"):
        loading.load_base_weights(module_with(shapes), str(root / "lora"), arch, PAR, 0, 1)
