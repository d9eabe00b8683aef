"""Generation with a LoRA adapter (--lora-load) against HF generate on the merged model.

Oracle: the base HF model with every adapted linear replaced by W + (alpha / r) * B @ A, computed here in fp32
in megatron's layout and mapped back to HF tensors with the converter's shard rules, then HF ``generate``.
The adapter is random with B != 0 (a fresh LoRA has B = 0 and would test nothing).
"""

import pytest
import torch

from mindspeed_lora import tiny
from mindspeed_lora.checkpoint.sharding import merge_shards
from mindspeed_lora.checkpoint.weight_map import stage_rules
from mindspeed_lora.errors import UserError
from mindspeed_lora.models.arch import ModelArch
from mindspeed_lora.models.builder import ParallelOptions
from mindspeed_lora.models.family import read_hf_config
from tests.unit.test_inference import NEW, _hf_generate, _ours, _prompts, build_lively_model

TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
R, ALPHA = 4, 8


def random_adapter(base_state: dict, r: int = R, seed: int = 0, targets=TARGETS) -> dict:
    """Adapter tensors at TP=1 in the checkpoint's key layout: ``<linear>.lora_A.default.weight`` [r, in] and
    ``<linear>.lora_B.default.weight`` [out, r] for each adapted linear of ``base_state`` (megatron keys)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, w in sorted(base_state.items()):
        linear = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and linear.rsplit(".", 1)[-1] in targets:
            out[f"{linear}.lora_A.default.weight"] = torch.randn(r, w.shape[1], generator=g) * 0.2
            out[f"{linear}.lora_B.default.weight"] = torch.randn(w.shape[0], r, generator=g) * 0.2
    return out


def merged_hf_model(hf, hf_dir: str, base_state: dict, adapter: dict, scaling: float):
    """A copy of ``hf`` whose adapted weights are W + scaling * B @ A (fp32, megatron layout -> HF tensors)."""
    import copy

    arch = ModelArch.from_hf_config(read_hf_config(hf_dir))
    rules = stage_rules(arch, ParallelOptions(), 0)
    merged = copy.deepcopy(hf)
    hf_params = dict(merged.named_parameters())
    with torch.no_grad():
        for key, rule in rules.items():
            linear = key.rsplit(".", 1)[0]
            a = adapter.get(f"{linear}.lora_A.default.weight")
            if a is None or not key.endswith(".weight"):
                continue
            b = adapter[f"{linear}.lora_B.default.weight"]
            full = base_state[key].double() + scaling * (b.double() @ a.double())
            parts = merge_shards(rule.kind, [full], num_heads=arch.num_attention_heads,
                                 num_groups=arch.num_query_groups, head_dim=arch.kv_channels)
            for name, t in zip(rule.hf_names, parts):
                hf_params[name].copy_(t.to(hf_params[name].dtype))
    return merged


def _megatron_state(hf_dir):
    """The base model's weights in megatron layout at TP=1 (what a converted checkpoint holds)."""
    from mindspeed_lora.checkpoint.hf_reader import HFCheckpointReader
    from mindspeed_lora.checkpoint.weight_map import load_hf_weights
    from mindspeed_lora.models.builder import build_gpt_model
    from mindspeed_lora.training.model import checkpoint_weight_keys

    arch = ModelArch.from_hf_config(read_hf_config(hf_dir))
    model = build_gpt_model(arch, ParallelOptions(), pre_process=True, post_process=True)
    load_hf_weights(model, HFCheckpointReader(hf_dir), arch, ParallelOptions(), 0, 0)
    return {k: v.detach().clone() for k, v in checkpoint_weight_keys(model).items()}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from mindspeed_lora.parallel import initialize

    initialize(1, 1, seed=5)
    path = str(tmp_path_factory.mktemp("lora_base"))
    hf = build_lively_model("qwen3", path, seed=21)
    tiny.build_tokenizer(path)
    return path, hf, _megatron_state(path)


def test_merge_oracle_is_the_base_model_when_b_is_zero(base):
    """The oracle itself: a zero delta reproduces the base model exactly, a random one changes it."""
    path, hf, state = base
    adapter = random_adapter(state)
    zero = {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in adapter.items()}
    same = merged_hf_model(hf, path, state, zero, ALPHA / R)
    for (n, p), (_, q) in zip(hf.named_parameters(), same.named_parameters()):
        assert torch.equal(p, q), n
    changed = merged_hf_model(hf, path, state, adapter, ALPHA / R)
    ids = torch.tensor([_prompts((8,))[0]])
    with torch.no_grad():
        assert not torch.allclose(hf(ids).logits, changed(ids).logits, atol=1e-3)


def _write_adapter_checkpoint(save_dir, hf_dir, adapter, parallel=None, iteration=1):
    """The adapter (this rank's shard) as iteration ``iteration`` of a LoRA checkpoint in the layout training saves
    (adapter keys only); collective over the ranks of the world."""
    from mindspeed_lora.parallel import rank_info
    from mindspeed_lora.training.checkpointing import save_checkpoint
    from mindspeed_lora.training.model import metadata_for

    arch = ModelArch.from_hf_config(read_hf_config(hf_dir))
    lora_meta = {"r": R, "alpha": ALPHA, "target_modules": list(TARGETS), "dropout": 0.0, "use_rslora": False}
    save_checkpoint(save_dir, iteration, model_state=adapter, optimizer=None, scheduler=None, rank=rank_info(),
                    consumed_train_samples=0, args={},
                    metadata=metadata_for(arch, parallel or ParallelOptions(), torch.float32, lora_meta, iteration),
                    save_optim=False, save_rng=False, hf_source=hf_dir)


def test_lora_greedy_equals_hf_generate_on_the_merged_model(base, tmp_path):
    """Base converted to Megatron + adapter checkpoint, as users run it; oracles: HF generate on the
    converter's merged export and on the merge computed here. The adapter is iteration 1 of two, read with
    --ckpt-step 1 (the latest, another adapter, generates otherwise); an iteration not saved is refused."""
    pytest.importorskip("mindspeed_lora.lora.spec", reason="the LoRA package (mindspeed_lora/lora) is not in this tree")
    from transformers import AutoModelForCausalLM

    from mindspeed_lora.inference.model import ModelSource, build_inference_engine
    from tests.unit.test_inference import convert

    path, hf, state = base
    mg = str(tmp_path / "mg")
    convert("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", path, "--save-dir", mg)
    adapter = random_adapter(state, seed=3)
    lora_dir = str(tmp_path / "lora")
    _write_adapter_checkpoint(lora_dir, path, adapter)
    merged_dir = str(tmp_path / "merged")
    convert("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", mg, "--lora-load", lora_dir,
            "--save-dir", merged_dir)
    exported = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    _write_adapter_checkpoint(lora_dir, path, random_adapter(state, seed=4), iteration=2)  # now the latest

    engine, _ = build_inference_engine(ModelSource(load=mg, lora_load=lora_dir, ckpt_step=1), tp_rank=0)
    prompts = _prompts(seed=12)
    ours = _ours(engine, prompts)
    assert ours == _hf_generate(exported, prompts, do_sample=False)
    assert ours == _hf_generate(merged_hf_model(hf, path, state, adapter, ALPHA / R), prompts, do_sample=False)
    assert ours != _hf_generate(hf, prompts, do_sample=False), "the adapter changed nothing: a weak test"
    assert ours == _ours(engine, prompts, use_kv_cache=False)
    assert max(len(r) for r in ours) == NEW
    latest, _ = build_inference_engine(ModelSource(load=mg, lora_load=lora_dir), tp_rank=0)
    assert _ours(latest, prompts) != ours
    with pytest.raises(UserError, match=r"--ckpt-step 3: --lora-load .*/lora: no iteration 3 \(no iter_0000003; "
                                        r"saved iterations: 1, 2\)"):
        build_inference_engine(ModelSource(load=mg, lora_load=lora_dir, ckpt_step=3), tp_rank=0)
    with pytest.raises(UserError, match=r"--ckpt-step 2: --load .*/mg: no iteration 2 .*saved iterations: 1\)"):
        build_inference_engine(ModelSource(load=mg, ckpt_step=2), tp_rank=0)


def test_lora_settings_that_disagree_or_are_missing_are_refused(base, tmp_path):
    pytest.importorskip("mindspeed_lora.lora.spec", reason="the LoRA package (mindspeed_lora/lora) is not in this tree")
    from mindspeed_lora.errors import UserError
    from mindspeed_lora.inference.model import ModelSource, build_inference_engine
    from mindspeed_lora.lora import LoraConfig

    path, _, state = base
    adapter = random_adapter(state, seed=3)
    lora_dir = str(tmp_path / "lora")
    _write_adapter_checkpoint(lora_dir, path, adapter)
    flags = LoraConfig(r=8, alpha=ALPHA, target_modules=list(TARGETS))
    with pytest.raises(UserError, match=r"--lora-load .*does not match the LoRA flags: r 4 vs 8"):
        build_inference_engine(ModelSource(load=path, lora_load=lora_dir, lora=flags), tp_rank=0)
    with pytest.raises(UserError, match=r"--lora-load .*: no mindspeed_lora.json"):
        build_inference_engine(ModelSource(load=path, lora_load=str(tmp_path)), tp_rank=0)
    only_qkv = random_adapter(state, seed=3, targets=("linear_qkv",))
    partial = str(tmp_path / "partial")
    _write_adapter_checkpoint(partial, path, only_qkv)  # metadata says all four, shards hold one
    with pytest.raises(UserError, match=r"model_optim_rng.pt: no tensor '.*lora_A.default.weight' .*the model has"):
        build_inference_engine(ModelSource(load=path, lora_load=partial), tp_rank=0)
