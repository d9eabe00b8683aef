"""LoraConfig: validation, target expansion, scaling, round trips, and the --lora-* flags."""
import argparse
import math

import pytest

from mindspeed_lora.arguments.common import add_lora_args
from mindspeed_lora.errors import UserError
from mindspeed_lora.lora import LoraConfig, lora_config_from_args

ALL = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


def _args(argv):
    p = argparse.ArgumentParser()
    add_lora_args(p)
    return p.parse_args(argv)


def test_all_linear_expands_in_canonical_order_and_merges_duplicates():
    assert LoraConfig(target_modules=["all-linear"]).target_modules == ALL
    assert LoraConfig(target_modules=["linear_fc2", "linear_qkv", "linear_qkv"]).target_modules == \
        ["linear_qkv", "linear_fc2"]
    assert LoraConfig(target_modules="linear_proj").target_modules == ["linear_proj"]


def test_scaling_plain_and_rslora():
    assert LoraConfig(r=8, alpha=16).scaling == 2.0
    assert math.isclose(LoraConfig(r=16, alpha=32, use_rslora=True).scaling, 8.0)


@pytest.mark.parametrize("kwargs, words", [
    (dict(r=0), "--lora-r"),
    (dict(r=2.5), "--lora-r"),
    (dict(alpha=0), "--lora-alpha"),
    (dict(alpha=float("nan")), "--lora-alpha"),
    (dict(dropout=1.0), "--lora-dropout"),
    (dict(dropout=-0.1), "--lora-dropout"),
    (dict(target_modules=[]), "non-empty"),
    (dict(target_modules=["q_proj"]), "'q_proj'"),
    (dict(fusion=True, dropout=0.1), "--lora-fusion"),
])
def test_bad_values_are_user_errors_naming_the_flag(kwargs, words):
    with pytest.raises(UserError, match=words):
        LoraConfig(**kwargs)


def test_dict_round_trip_and_unknown_key():
    cfg = LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["linear_fc1"], use_rslora=True)
    assert LoraConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(UserError, match="mindspeed_lora.json: unknown LoRA keys \\['rank'\\]"):
        LoraConfig.from_dict({"rank": 4}, source="mindspeed_lora.json")
    with pytest.raises(UserError, match="mindspeed_lora.json: --lora-r"):
        LoraConfig.from_dict({"r": -1}, source="mindspeed_lora.json")


def test_from_args_reads_every_flag():
    args = _args(["--lora-r", "8", "--lora-alpha", "4", "--lora-dropout", "0.05", "--lora-target-modules",
                  "linear_qkv", "linear_fc2", "--lora-use-rslora"])
    cfg = lora_config_from_args(args)
    assert cfg == LoraConfig(r=8, alpha=4, dropout=0.05, target_modules=["linear_qkv", "linear_fc2"],
                             use_rslora=True, fusion=False)
    fused = lora_config_from_args(_args(["--lora-target-modules", "all-linear", "--lora-fusion"]))
    assert fused.fusion and fused.target_modules == ALL and (fused.r, fused.alpha) == (16, 32)


def test_no_targets_means_no_lora():
    assert lora_config_from_args(_args([])) is None
    assert lora_config_from_args(_args(["--lora-r", "8"])) is None


def test_importing_the_config_does_not_load_megatron():
    import subprocess
    import sys

    code = ("import sys; from mindspeed_lora.lora import LoraConfig; "
            "assert not any(m.startswith('megatron') for m in sys.modules), 'megatron imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_checkpoint_side_config_expands_and_refuses_targets_as_the_flags_do():
    """lora_layout's config (what convert_ckpt and the loaders read from mindspeed_lora.json) takes the same
    names, in the same order, with the same messages, and says which file a bad entry came from."""
    from mindspeed_lora.checkpoint.lora_layout import LoraCheckpointConfig

    assert LoraCheckpointConfig(r=4, alpha=8, target_modules=("linear_fc2", "all-linear")).target_modules == \
        tuple(ALL)
    ck = LoraCheckpointConfig.from_metadata({"r": 4, "alpha": 8, "target_modules": "linear_fc1"}, "m.json")
    assert ck.target_modules == ("linear_fc1",)
    for targets in ([], ["q_proj"]):
        with pytest.raises(UserError) as flags:
            LoraConfig(target_modules=targets)
        with pytest.raises(UserError) as meta:
            LoraCheckpointConfig.from_metadata({"r": 4, "alpha": 8, "target_modules": targets}, "m.json key 'lora'")
        assert str(meta.value) == f"m.json key 'lora': {flags.value}"
    assert "HF names like q_proj are not accepted" in str(meta.value)
