"""convert_ckpt's weight paths: hf -> mg -> hf and mg -> mg -> hf, for each family and TP/PP layout.

Oracles: the HF model's own safetensors (the round trip must give them back bit for bit, dtype included)
and the Megatron layout of FACTS.md written out by plain loops in ``tests/convert_fixtures.py`` (each shard
must equal it exactly). That the layout runs in megatron-core and gives HF's logits is checked in
``test_convert_megatron.py`` and, at TP=2 / PP=2 on two ranks, in ``tests/distributed/checks_convert.py``.
"""
import json
import os
import zipfile

import pytest
import torch

from mindspeed_lora.arguments.convert import ConvertConfig
from mindspeed_lora.checkpoint.convert import convert
from tests.convert_fixtures import arch_of, expected_base_shards, hf_tensors, megatron_shard, tiny_hf

FAMILIES = ["qwen3", "llama3", "qwen2"]
# (TP, PP, --num-layer-list) over a 4-layer model
LAYOUTS = [(1, 1, None), (2, 1, None), (4, 1, None), (1, 2, None), (2, 2, None), (4, 2, None),
           (2, 2, [1, 3]), (4, 2, [3, 1])]


def run(load, save, load_type="hf", save_type="mg", **kw):
    return convert(ConvertConfig(load_model_type=load_type, save_model_type=save_type, load_dir=str(load),
                                 save_dir=str(save), progress=False, **kw))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for i, family in enumerate(FAMILIES):
        path = tmp_path_factory.mktemp(family)
        tiny_hf(family, str(path), seed=10 + i)
        out[family] = str(path)
    return out


def layer_list(pp, given, layers=4):
    return given or [layers // pp] * pp


def assert_same_tensors(got: dict, want: dict, where: str):
    assert sorted(got) == sorted(want), where
    for k in want:
        assert got[k].dtype == want[k].dtype, f"{where}: {k} dtype {got[k].dtype} vs {want[k].dtype}"
        assert torch.equal(got[k], want[k]), f"{where}: {k} differs"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tp,pp,nll", LAYOUTS, ids=lambda v: str(v))
def test_hf_mg_hf_is_bit_identical(models, family, tp, pp, nll, tmp_path):
    hf_dir = models[family]
    mg, back = tmp_path / "mg", tmp_path / "hf"
    run(hf_dir, mg, target_tp=tp, target_pp=pp, num_layer_list=nll)
    counts = layer_list(pp, nll)
    arch = arch_of(hf_dir)
    expected = expected_base_shards(hf_tensors(hf_dir), arch, tp, counts)
    for (rank, stage), want in expected.items():
        shard = megatron_shard(str(mg), rank, stage, pp)
        assert shard["iteration"] == 1 and shard["checkpoint_version"] == 3.0
        assert_same_tensors(shard["model"], want, f"TP rank {rank} PP rank {stage}")
    meta = json.load(open(mg / "mindspeed_lora.json"))
    assert (meta["tensor_model_parallel_size"], meta["pipeline_model_parallel_size"]) == (tp, pp)
    assert meta["num_layer_list"] == counts and meta["lora"] is None and meta["params_dtype"] == "float32"
    assert (mg / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert {"config.json", "tokenizer.json"} <= set(os.listdir(mg / "hf_config"))

    run(mg, back, "mg", "hf")
    assert_same_tensors(hf_tensors(str(back)), hf_tensors(hf_dir), "hf -> mg -> hf")
    assert json.load(open(back / "config.json"))["dtype"] == "float32"
    assert {"tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json"} <= set(os.listdir(back))


@pytest.mark.parametrize("family", FAMILIES)
def test_mg_reshard_tp2pp2_to_tp1pp1_then_hf(models, family, tmp_path):
    hf_dir = models[family]
    run(hf_dir, tmp_path / "a", target_tp=2, target_pp=2, num_layer_list=[1, 3])
    run(tmp_path / "a", tmp_path / "b", "mg", "mg")
    want = expected_base_shards(hf_tensors(hf_dir), arch_of(hf_dir), 1, [4])[(0, 0)]
    assert_same_tensors(megatron_shard(str(tmp_path / "b"), 0, 0, 1)["model"], want, "mg TP2 PP2 -> mg TP1 PP1")
    run(tmp_path / "b", tmp_path / "hf", "mg", "hf")
    assert_same_tensors(hf_tensors(str(tmp_path / "hf")), hf_tensors(hf_dir), "mg -> mg -> hf")


def test_mg_reshard_up_to_tp4_uneven_pp(models, tmp_path):
    hf_dir = models["qwen2"]
    run(hf_dir, tmp_path / "a", target_tp=2, target_pp=1)
    run(tmp_path / "a", tmp_path / "b", "mg", "mg", target_tp=4, target_pp=2, num_layer_list=[3, 1])
    expected = expected_base_shards(hf_tensors(hf_dir), arch_of(hf_dir), 4, [3, 1])
    for (rank, stage), want in expected.items():
        assert_same_tensors(megatron_shard(str(tmp_path / "b"), rank, stage, 2)["model"], want, f"{rank},{stage}")


def test_bf16_model_stays_bf16_and_params_dtype_is_explicit(tmp_path):
    hf_dir = str(tmp_path / "hf")
    tiny_hf("qwen3", hf_dir, dtype="bfloat16")
    run(hf_dir, tmp_path / "mg", target_tp=2)
    meta = json.load(open(tmp_path / "mg" / "mindspeed_lora.json"))
    assert meta["params_dtype"] == "bfloat16" and meta["arch"]["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in megatron_shard(str(tmp_path / "mg"), 0, 0, 1)["model"].values())
    run(tmp_path / "mg", tmp_path / "back", "mg", "hf")
    assert_same_tensors(hf_tensors(str(tmp_path / "back")), hf_tensors(hf_dir), "bf16 round trip")
    assert json.load(open(tmp_path / "back" / "config.json"))["dtype"] == "bfloat16"
    # an explicit --params-dtype converts once; the metadata says so
    run(hf_dir, tmp_path / "mg32", params_dtype="float32")
    shard = megatron_shard(str(tmp_path / "mg32"), 0, 0, 1)["model"]
    assert shard["embedding.word_embeddings.weight"].dtype == torch.float32
    assert torch.equal(shard["embedding.word_embeddings.weight"],
                       hf_tensors(hf_dir)["model.embed_tokens.weight"].float())
    assert json.load(open(tmp_path / "mg32" / "mindspeed_lora.json"))["params_dtype"] == "float32"


def test_hf_output_is_sharded_and_loads_in_transformers(models, tmp_path):
    from transformers import AutoModelForCausalLM

    hf_dir = models["qwen2"]
    run(hf_dir, tmp_path / "mg", target_pp=2)
    run(tmp_path / "mg", tmp_path / "hf", "mg", "hf", max_shard_size=200_000)
    index = json.load(open(tmp_path / "hf" / "model.safetensors.index.json"))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all(os.path.isfile(tmp_path / "hf" / f) for f in files)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in hf_tensors(hf_dir).values())
    ours = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    ref = AutoModelForCausalLM.from_pretrained(hf_dir)
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)


def test_megatron_shards_are_valid_torch_zip_files(models, tmp_path):
    """The streamed shard is a well-formed zip (CRCs right) holding what torch.save would."""
    run(models["qwen3"], tmp_path / "mg", target_tp=2)
    path = tmp_path / "mg" / "iter_0000001" / "mp_rank_01" / "model_optim_rng.pt"
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
    state = torch.load(path, weights_only=True)
    torch.save(state, tmp_path / "ref.pt")
    again = torch.load(tmp_path / "ref.pt", weights_only=True)
    assert state.keys() == again.keys() and state["args"] == again["args"]
    assert_same_tensors(state["model"], again["model"], "streamed vs torch.save")
    mmapped = torch.load(path, weights_only=True, mmap=True)
    assert_same_tensors(mmapped["model"], state["model"], "mmap load")
