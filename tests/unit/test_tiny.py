"""The tiny-model CLI (``python -m mindspeed_lora.tiny``) the quickstart runs: its flags reach the model."""
import json

import torch
from safetensors.torch import load_file

from mindspeed_lora import tiny


def test_cli_initializer_range_gives_the_library_model(tmp_path):
    tiny.main(["--family", "qwen3", "--out", str(tmp_path), "--seed", "0", "--initializer-range", "0.2"])
    assert json.load(open(tmp_path / "config.json"))["initializer_range"] == 0.2
    assert (tmp_path / "tokenizer.json").is_file()
    saved = load_file(str(tmp_path / "model.safetensors"))
    want = tiny.build_hf_model("qwen3", seed=0, initializer_range=0.2).state_dict()
    for name, t in saved.items():
        assert torch.equal(t, want[name]), name
    emb = saved["model.embed_tokens.weight"]
    assert 0.18 < emb.std().item() < 0.22  # the range reached the init, not only config.json


def test_cli_default_keeps_transformers_range(tmp_path):
    tiny.main(["--family", "llama3", "--out", str(tmp_path)])
    assert json.load(open(tmp_path / "config.json"))["initializer_range"] == 0.02
    assert 0.018 < load_file(str(tmp_path / "model.safetensors"))["model.embed_tokens.weight"].std().item() < 0.022
