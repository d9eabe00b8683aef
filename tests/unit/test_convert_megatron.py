"""Converted checkpoints in megatron-core: --test-convert-precision, and LoRA merge vs megatron + adapter.

Oracles: HF transformers' logits on the source model (the precision test), and a TP=1 megatron-core model
with the adapter applied as activations (forward hooks adding s * x A^T B^T to each adapted linear, A and B
in the contract's layout from ``tests/convert_fixtures.py``) for the merged export.
"""
import os

import pytest
import torch

from mindspeed_lora.arguments.convert import ConvertConfig
from mindspeed_lora.checkpoint.convert import PrecisionFailure, convert
from mindspeed_lora.errors import UserError
from mindspeed_lora.parallel import initialize
from tests.convert_fixtures import (
    LINEARS,
    arch_of,
    contract_shards,
    hf_tensors,
    random_adapter,
    tiny_hf,
    write_lora_checkpoint,
)

R, ALPHA = 4, 8.0


def run(load, save, load_type, save_type, **kw):
    return convert(ConvertConfig(load_model_type=load_type, save_model_type=save_type, load_dir=str(load),
                                 save_dir=str(save), progress=False, **kw))


@pytest.fixture(scope="module")
def world():
    initialize(1, 1, seed=3)


@pytest.fixture(scope="module")
def models(tmp_path_factory, world):
    """A lively qwen2 (qkv bias, tied embeddings), its TP2 PP2 conversion, an adapter and its LoRA checkpoint."""
    root = tmp_path_factory.mktemp("mgprec")
    hf_dir = str(root / "hf")
    tiny_hf("qwen2", hf_dir, seed=4, lively=True)
    run(hf_dir, root / "mg", "hf", "mg", target_tp=2, target_pp=2, num_layer_list=[3, 1])
    arch = arch_of(hf_dir)
    adapter = random_adapter(hf_tensors(hf_dir), arch, R, seed=9)
    write_lora_checkpoint(str(root / "lora"), contract_shards(adapter, arch, 2, [2, 2]), arch, 2, [2, 2], R, ALPHA)
    return root, hf_dir, arch, adapter


def test_precision_passes_on_good_conversions(models, tmp_path):
    root, hf_dir, arch, _ = models
    for result in (run(hf_dir, tmp_path / "mg", "hf", "mg", target_tp=4, target_pp=2, test_precision=True),
                   run(root / "mg", tmp_path / "hf", "mg", "hf", test_precision=True),
                   run(root / "mg", tmp_path / "mg2", "mg", "mg", target_tp=1, test_precision=True),
                   run(root / "mg", tmp_path / "merged", "mg", "hf", lora_load=str(root / "lora"),
                       test_precision=True)):
        report = result.precision
        assert report.mean_diff < 1e-5 and report.max_diff < 1e-4, report.line()
        assert report.argmax_mismatches == 0 and report.tokens == 64
        assert os.path.isdir(result.save_dir)


def test_yarn_model_converts_and_trains_side_logits_equal_hf(world, tmp_path):
    """A Qwen3 with YaRN (context 16 stretched x4) through megatron-core's own attention (the training model):
    the precision test's 64-token probe reaches 4x past the original context."""
    hf_dir = str(tmp_path / "hf")
    tiny_hf("qwen3", hf_dir, seed=6, lively=True, max_position_embeddings=128,
            rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})
    report = run(hf_dir, tmp_path / "mg", "hf", "mg", target_tp=2, test_precision=True).precision
    assert report.mean_diff < 1e-5 and report.argmax_mismatches == 0, report.line()


def test_precision_of_a_peft_adapter_export(models, tmp_path, monkeypatch):
    """--save-lora-to-hf --test-convert-precision: peft over the HF base with the written adapter vs megatron-core
    with the adapter; a B whose rows are exported in the wrong order fails it and publishes nothing."""
    from mindspeed_lora.checkpoint.hf_writer import SafetensorsWriter

    root, _, _, _ = models
    result = run(root / "mg", tmp_path / "peft", "mg", "hf", lora_load=str(root / "lora"), save_lora_to_hf=True,
                 test_precision=True)
    assert result.precision.mean_diff < 1e-5 and result.precision.argmax_mismatches == 0, result.precision.line()
    assert os.path.isfile(tmp_path / "peft" / "adapter_model.safetensors")
    with pytest.raises(UserError, match="give the base checkpoint as --load-dir and the adapter as --lora-load"):
        run(root / "lora", tmp_path / "no_base", "mg", "hf", save_lora_to_hf=True, test_precision=True)

    write = SafetensorsWriter.write
    monkeypatch.setattr(SafetensorsWriter, "write",
                        lambda self, name, t: write(self, name, t.flip(0) if ".lora_B." in name else t))
    with pytest.raises(PrecisionFailure):
        run(root / "mg", tmp_path / "bad", "mg", "hf", lora_load=str(root / "lora"), save_lora_to_hf=True,
            test_precision=True)
    assert not os.path.exists(tmp_path / "bad")


def test_precision_fails_on_a_corrupted_conversion(models, tmp_path, monkeypatch):
    """k and v swapped inside the fused QKV: a mapping bug the round trip alone would not notice."""
    import mindspeed_lora.checkpoint.sharding as sharding

    _, hf_dir, _, _ = models
    interleave = sharding.interleave_qkv
    monkeypatch.setattr(sharding, "interleave_qkv", lambda q, k, v, groups: interleave(q, v, k, groups))
    with pytest.raises(PrecisionFailure) as e:
        run(hf_dir, tmp_path / "bad", "hf", "mg", target_tp=2, test_precision=True)
    assert e.value.report.mean_diff > 0.1
    assert not os.path.exists(tmp_path / "bad") and os.listdir(tmp_path) == []


def test_merged_export_equals_megatron_with_the_adapter(models, tmp_path):
    from transformers import AutoModelForCausalLM

    from mindspeed_lora.checkpoint.hf_reader import HFCheckpointReader
    from mindspeed_lora.checkpoint.precision import megatron_model, probe_ids

    root, hf_dir, arch, adapter = models
    run(root / "mg", tmp_path / "merged", "mg", "hf", lora_load=str(root / "lora"))
    mcore = megatron_model(HFCheckpointReader(hf_dir), arch).eval()
    tp1 = contract_shards(adapter, arch, 1, [arch.num_layers])[(0, 0)]
    modules = dict(mcore.named_modules())

    def lora_hook(a, b):
        def hook(module, args, out):
            return (out[0] + (ALPHA / R) * (args[0] @ a.t()) @ b.t(), *out[1:])
        return hook

    handles = []
    for layer in range(arch.num_layers):
        for path, _ in LINEARS.values():
            key = f"decoder.layers.{layer}.{path}"
            handles.append(modules[key].register_forward_hook(
                lora_hook(tp1[f"{key}.lora_A.default.weight"], tp1[f"{key}.lora_B.default.weight"])))
    ids = probe_ids(arch.vocab_size)
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        want = mcore(ids, pos, None)
        got = merged(ids).logits
        for h in handles:
            h.remove()
        base = mcore(ids, pos, None)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (want - base).abs().mean() > 100 * (want - got).abs().mean(), "the adapter changed too little to test"


def test_loading_into_megatron_models(models, tmp_path):
    """loading.load_base_weights from an HF dir and from a Megatron dir gives HF's logits; another layout is
    refused with both layouts and the reshard command named."""
    from mindspeed_lora.checkpoint import loading
    from mindspeed_lora.checkpoint.precision import compare
    from mindspeed_lora.errors import UserError
    from mindspeed_lora.models.builder import ParallelOptions, build_gpt_model

    root, hf_dir, arch, _ = models
    run(root / "mg", tmp_path / "tp1", "mg", "mg")
    assert loading.resolve_arch(str(tmp_path / "tp1")) == arch
    assert loading.resolve_arch(hf_dir) == arch
    for source in (hf_dir, str(tmp_path / "tp1")):
        model = build_gpt_model(arch, ParallelOptions(), pre_process=True, post_process=True)
        loading.load_base_weights(model, source, arch, ParallelOptions(), 0, 0)
        report = compare(hf_dir, model)
        assert report.max_diff < 1e-4, (source, report.line())
    with pytest.raises(UserError) as e:
        loading.load_base_weights(model, str(root / "mg"), arch, ParallelOptions(), 0, 0)
    msg = str(e.value)
    assert "tensor-model-parallel-size 2, pipeline-model-parallel-size 2" in msg and "this run uses 1, 1" in msg
    assert "convert_ckpt.py --load-model-type mg --save-model-type mg" in msg


def test_real_lora_layers_load_the_converted_adapter(models, tmp_path):
    """With the LoRA layers of mindspeed_lora.lora: base + adapter loaded by ``loading`` equals the merged export."""
    pytest.importorskip("mindspeed_lora.lora.spec", reason="the LoRA layers are not in this tree")
    from transformers import AutoModelForCausalLM

    from mindspeed_lora.checkpoint import loading
    from mindspeed_lora.checkpoint.precision import compare_models
    from mindspeed_lora.lora.spec import lora_spec_hook
    from mindspeed_lora.models.builder import ModelOptions, ParallelOptions, build_gpt_model

    root, hf_dir, arch, _ = models
    run(root / "mg", tmp_path / "merged", "mg", "hf", lora_load=str(root / "lora"))
    run(root / "mg", tmp_path / "base1", "mg", "mg")
    run(root / "lora", tmp_path / "lora1", "mg", "mg")
    cfg = loading.resolve_lora_config(str(tmp_path / "lora1"))
    model = build_gpt_model(arch, ParallelOptions(), ModelOptions(spec_hooks=[lora_spec_hook(cfg)]),
                            pre_process=True, post_process=True)
    assert any(".base_layer." in k for k in model.state_dict())
    loading.load_base_weights(model, str(tmp_path / "base1"), arch, ParallelOptions(), 0, 0)
    loading.load_lora_weights(model, str(tmp_path / "lora1"), cfg, ParallelOptions(), 0, 0)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    report = compare_models(merged, model, arch.vocab_size)
    assert report.max_diff < 1e-4, report.line()
