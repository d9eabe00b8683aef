"""convert_ckpt.py on Megatron checkpoints written by MindSpeed-LLM / Megatron-LM (no mindspeed_lora.json).

The foreign checkpoints are written here from the layout contract (``tests/convert_fixtures.py``) the way
Megatron's legacy saver does it: ``args`` pickled as an argparse.Namespace (with a torch dtype and an enum),
RNG state with numpy's state, scheduler state, non-tensor ``_extra_state``. Oracles: the HF tensors they were
built from (bit for bit), the adapter drawn in HF terms (PEFT names, W + s·B·A in fp32), and a file whose
pickle would run a command if what it names were called.
"""
import argparse
import enum
import io
import os
import random
import shutil

import numpy as np
import pytest
import torch

from mindspeed_lora.arguments.convert import ConvertConfig
from mindspeed_lora.checkpoint.convert import convert
from mindspeed_lora.errors import UserError
from tests.convert_fixtures import (
    ALL_TARGETS,
    arch_of,
    contract_shards,
    expected_base_shards,
    hf_tensors,
    merged_oracle,
    peft_state,
    random_adapter,
    tiny_hf,
)

R, ALPHA = 4, 8


class AttnBackend(enum.Enum):  # megatron-core keeps an enum like this in its args
    flash = 1
    auto = 5


class RunsACommand:
    """Pickled as a call of os.system: loading it with plain pickle would create ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def megatron_args(arch, tp, pp, counts, **extra) -> argparse.Namespace:
    return argparse.Namespace(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads, group_query_attention=True,
        num_query_groups=arch.num_query_groups, kv_channels=arch.kv_channels, add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_layernorm, untie_embeddings_and_output_weights=not arch.tie_word_embeddings,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        num_layer_list=",".join(map(str, counts)) if pp > 1 else None, params_dtype=torch.float32,
        attention_backend=AttnBackend.auto, seq_length=4096, **extra)


def write_foreign(path: str, shards: dict, args: argparse.Namespace, pp: int, iteration: int = 1) -> None:
    for (rank, stage), sd in shards.items():
        name = f"mp_rank_{rank:02d}" if pp == 1 else f"mp_rank_{rank:02d}_{stage:03d}"
        d = os.path.join(path, f"iter_{iteration:07d}", name)
        os.makedirs(d, exist_ok=True)
        model = dict(sd)
        model["decoder.layers.0.self_attention.core_attention._extra_state"] = io.BytesIO(b"te state")
        model["decoder.layers.0.mlp.linear_fc1._extra_state"] = torch.empty(0)
        torch.save({"args": args, "checkpoint_version": 3.0, "iteration": iteration, "model": model,
                    "opt_param_scheduler": {"max_lr": 1e-4, "num_steps": 64},
                    "rng_state": [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                                   "torch_rng_state": torch.get_rng_state(), "rng_tracker_states": {}}]},
                   os.path.join(d, "model_optim_rng.pt"))
    with open(os.path.join(path, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))


def run(load, save, load_type, save_type, **kw):
    return convert(ConvertConfig(load_model_type=load_type, save_model_type=save_type, load_dir=str(load),
                                 save_dir=str(save), progress=False, **kw))


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """An HF model and its foreign base checkpoint at TP 2 x PP 2 (layers 1 + 3)."""
    root = tmp_path_factory.mktemp("foreign")
    hf_dir = str(root / "hf")
    tiny_hf("qwen3", hf_dir, seed=3, lively=True)
    hf, arch = hf_tensors(hf_dir), arch_of(hf_dir)
    counts = [1, 3]
    base = str(root / "msllm_base")
    write_foreign(base, expected_base_shards(hf, arch, 2, counts), megatron_args(arch, 2, 2, counts), 2,
                  iteration=1)
    return hf_dir, hf, arch, base


def test_export_to_hf_is_bit_identical(foreign, tmp_path):
    hf_dir, hf, _, base = foreign
    run(base, tmp_path / "out", "mg", "hf", hf_cfg_dir=hf_dir)
    got = hf_tensors(str(tmp_path / "out"))
    assert sorted(got) == sorted(hf)
    for k in hf:
        assert torch.equal(got[k], hf[k]), k


def test_mindspeed_style_save_dir_is_the_hf_model(foreign, tmp_path):
    """MindSpeed-LLM names the HF model as --save-dir and gets mg2hf/ in it: no --hf-cfg-dir needed."""
    hf_dir, hf, _, base = foreign
    target = tmp_path / "hf_copy"
    shutil.copytree(hf_dir, target)
    run(base, target, "mg", "hf")
    got = hf_tensors(str(target / "mg2hf"))
    assert all(torch.equal(got[k], hf[k]) for k in hf)


def test_import_into_our_format(foreign, tmp_path):
    """mg -> mg imports (resharded to TP 1) with mindspeed_lora.json and hf_config/; its export is identical."""
    import json

    hf_dir, hf, arch, base = foreign
    ours = tmp_path / "ours"
    run(base, ours, "mg", "mg", hf_cfg_dir=hf_dir)
    meta = json.load(open(ours / "mindspeed_lora.json"))
    assert (meta["tensor_model_parallel_size"], meta["pipeline_model_parallel_size"]) == (1, 1)
    assert meta["arch"] == arch.to_dict() and meta["lora"] is None
    assert os.path.isfile(ours / "hf_config" / "config.json")
    run(ours, tmp_path / "back", "mg", "hf")  # no --hf-cfg-dir: the import recorded everything
    got = hf_tensors(str(tmp_path / "back"))
    assert all(torch.equal(got[k], hf[k]) for k in hf)


def test_lora_checkpoint_merges_and_exports(foreign, tmp_path):
    """A --lora-ckpt-filter checkpoint (adapter keys only, LoRA settings in the args): merged into the foreign
    base = W + s·B·A of the HF tensors; exported as PEFT = the adapter under PEFT's names."""
    hf_dir, hf, arch, base = foreign
    adapter = random_adapter(hf, arch, R, seed=5)
    lora = str(tmp_path / "msllm_lora")
    args = megatron_args(arch, 2, 1, [arch.num_layers], lora_target_modules=list(ALL_TARGETS), lora_r=R,
                         lora_alpha=ALPHA, lora_fusion=False)
    write_foreign(lora, contract_shards(adapter, arch, 2, [arch.num_layers]), args, 1, iteration=200)
    run(base, tmp_path / "merged", "mg", "hf", hf_cfg_dir=hf_dir, lora_load=lora)
    want = merged_oracle(hf, adapter, ALPHA / R)
    got = hf_tensors(str(tmp_path / "merged"))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6, msg=k)
    run(lora, tmp_path / "peft", "mg", "hf", hf_cfg_dir=hf_dir, save_lora_to_hf=True)
    from safetensors.torch import load_file

    want = peft_state(adapter)
    for peft_dir in ("peft", "peft_of_import"):
        if peft_dir == "peft_of_import":  # imported into our format (TP 1), then exported: the same adapter
            run(lora, tmp_path / "imported", "mg", "mg", hf_cfg_dir=hf_dir)
            run(tmp_path / "imported", tmp_path / peft_dir, "mg", "hf", save_lora_to_hf=True)
        exported = load_file(str(tmp_path / peft_dir / "adapter_model.safetensors"))
        assert sorted(exported) == sorted(want)
        assert all(torch.equal(exported[k], want[k]) for k in want), peft_dir


def test_loading_never_calls_what_the_pickle_names(foreign, tmp_path):
    """Enums, numpy and BytesIO in a shard become inert (the tests above); a pickle naming os.system is
    refused with the shard named, and nothing runs."""
    hf_dir, hf, arch, _ = foreign
    marker = tmp_path / "ran"
    path = str(tmp_path / "msllm")
    args = megatron_args(arch, 1, 1, [arch.num_layers], hook=RunsACommand(str(marker)))
    write_foreign(path, expected_base_shards(hf, arch, 1, [arch.num_layers]), args, 1)
    assert not marker.exists()
    with pytest.raises(UserError, match="mp_rank_00/model_optim_rng.pt: not loaded: .*GLOBAL posix.system"):
        run(path, tmp_path / "out", "mg", "hf", hf_cfg_dir=hf_dir)
    assert not marker.exists(), "loading the checkpoint ran a command from it"


def test_refusals_name_what_is_wrong(foreign, tmp_path):
    hf_dir, hf, arch, base = foreign
    with pytest.raises(UserError, match="no mindspeed_lora.json .*MindSpeed-LLM or Megatron-LM, give the HF model "
                                        "it was converted from as --hf-cfg-dir"):
        run(base, tmp_path / "a", "mg", "hf")

    other = str(tmp_path / "hf_other")
    tiny_hf("qwen3", other, seed=3, layers=2)
    with pytest.raises(UserError, match="args.num_layers is 4, but .*config.json gives 2: --hf-cfg-dir is not the "
                                        "model"):
        run(base, tmp_path / "b", "mg", "hf", hf_cfg_dir=other)

    wrong = str(tmp_path / "wrong_args")
    write_foreign(wrong, expected_base_shards(hf, arch, 2, [4]), megatron_args(arch, 4, 1, [4]), 1)
    with pytest.raises(UserError, match="args.tensor_model_parallel_size is 4, but .* holds 2"):
        run(wrong, tmp_path / "c", "mg", "hf", hf_cfg_dir=hf_dir)

    gap = str(tmp_path / "gap")
    shutil.copytree(base, gap)
    shutil.rmtree(os.path.join(gap, "iter_0000001", "mp_rank_01_001"))
    with pytest.raises(UserError, match="shard directories missing: mp_rank_01_001"):
        run(gap, tmp_path / "d", "mg", "hf", hf_cfg_dir=hf_dir)

    vpp = str(tmp_path / "vpp")
    os.makedirs(os.path.join(vpp, "iter_0000001", "mp_rank_00"))
    torch.save({"args": megatron_args(arch, 1, 1, [4]), "model0": {}, "model1": {}},
               os.path.join(vpp, "iter_0000001", "mp_rank_00", "model_optim_rng.pt"))
    with open(os.path.join(vpp, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("1")
    with pytest.raises(UserError, match="virtual pipeline stages"):
        run(vpp, tmp_path / "e", "mg", "hf", hf_cfg_dir=hf_dir)
