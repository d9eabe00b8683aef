"""The fused-ops spec hook in a real megatron GPTModel (tiny Qwen3, fp32, CPU): HF transformers' logits with the
reference kernels and with the NPU kernels under the fake torch_npu; packed (THD) sequences equal each sequence
run alone; gradients equal megatron's local layers'; the checkpoint keys are unchanged; configs the fused
classes cannot take keep megatron's classes; the MindSpeed-LLM flags make the FusedOpsConfig.
"""
import logging

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from mindspeed_lora.arguments import build_parser
from mindspeed_lora.arguments.fused_ops import fused_ops_config
from mindspeed_lora.checkpoint.hf_reader import HFCheckpointReader
from mindspeed_lora.checkpoint.weight_map import load_hf_weights
from mindspeed_lora.models.arch import ModelArch
from mindspeed_lora.models.builder import ModelOptions, ParallelOptions, build_gpt_model, build_transformer_config
from mindspeed_lora.models.family import read_hf_config
from mindspeed_lora.ops import layers
from mindspeed_lora.ops.attention import segment_mask
from mindspeed_lora.ops.cross_entropy import fused_linear_cross_entropy
from mindspeed_lora.ops.spec import FusedOpsConfig, fused_ops_spec_hook
from mindspeed_lora.parallel import initialize
from tests.fake_torch_npu import npu_fixture  # noqa: F401 - fixture npu
from tests.unit.test_inference import build_lively_model

ALL_ON = dict(use_fused_rmsnorm=True, use_fused_swiglu=True, use_fused_rotary_pos_emb=True, use_flash_attn=True)
IMPLS = ["reference", "npu"]
SEQ = 24


@pytest.fixture(scope="module")
def world():
    initialize(1, 1, seed=11)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Qwen3 whose linear weights are scaled up, so attention is far from uniform and a wrong rotary,
    mask or norm shows in the logits."""
    path = str(tmp_path_factory.mktemp("qwen3"))
    build_lively_model("qwen3", path, seed=4)
    return path


def build(hf_dir, cfg: FusedOpsConfig | None):
    arch = ModelArch.from_hf_config(read_hf_config(hf_dir), hf_dir)
    par = ParallelOptions()
    options = ModelOptions(spec_hooks=[fused_ops_spec_hook(cfg)] if cfg else [])
    model = build_gpt_model(arch, par, options, pre_process=True, post_process=True)
    load_hf_weights(model, HFCheckpointReader(hf_dir), arch, par, 0, 0)
    return model.eval()


def ids(batch, seq, seed=0):
    return torch.randint(0, 512, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model, tokens, **kwargs):
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    return model(tokens, pos, kwargs.pop("attention_mask", None), **kwargs)


def test_hook_swaps_the_layer_classes_and_keeps_the_checkpoint_keys(world, hf_dir):
    plain = build(hf_dir, None)
    fused = build(hf_dir, FusedOpsConfig(**ALL_ON))
    layer = fused.decoder.layers[0]
    assert isinstance(layer.input_layernorm, layers.FusedRMSNorm)
    assert isinstance(layer.pre_mlp_layernorm, layers.FusedRMSNorm)
    assert isinstance(layer.self_attention, layers.FusedRopeSelfAttention)
    assert isinstance(layer.self_attention.q_layernorm, layers.FusedRMSNorm)
    assert isinstance(layer.self_attention.k_layernorm, layers.FusedRMSNorm)
    assert isinstance(layer.self_attention.core_attention, layers.FusedDotProductAttention)
    assert isinstance(layer.mlp, layers.FusedSwiGLUMLP)
    assert not isinstance(plain.decoder.layers[0].input_layernorm, layers.FusedRMSNorm)
    def shapes(model):
        return {k: getattr(v, "shape", None) for k, v in model.state_dict().items()}

    assert shapes(fused) == shapes(plain)


@pytest.mark.parametrize("impl", IMPLS)
def test_logits_match_hf(world, hf_dir, npu, impl):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokens = ids(2, SEQ)
    with torch.no_grad():
        expected = hf(tokens).logits
        # without positions the last token's output would not depend on the order of the tokens before it
        shuffled = torch.cat([tokens[:, :-1].flip(1), tokens[:, -1:]], dim=1)
        reordered = hf(shuffled).logits[:, -1]
        ours = logits(build(hf_dir, FusedOpsConfig(**ALL_ON, force_impl=impl)), tokens)
    assert (ours - expected).abs().max() < 1e-4
    assert (ours.argmax(-1) == expected.argmax(-1)).all()
    # the probe can tell: positional information moves the logits by far more than the tolerance
    assert (reordered - expected[:, -1]).abs().max() > 1e-2


@pytest.mark.parametrize("impl", IMPLS)
def test_packed_sequences_equal_each_sequence_alone(world, hf_dir, npu, impl):
    model = build(hf_dir, FusedOpsConfig(**ALL_ON, force_impl=impl))
    lengths = [7, 12, 5]
    cu = torch.tensor([0, 7, 19, 24], dtype=torch.int32)
    tokens = ids(1, sum(lengths), seed=1)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lengths),
                             max_seqlen_kv=max(lengths))
    with torch.no_grad():
        together = logits(model, tokens, packed_seq_params=packed)
        for i in range(len(lengths)):
            part = tokens[:, int(cu[i]):int(cu[i + 1])]
            alone = logits(model, part)
            assert (together[:, int(cu[i]):int(cu[i + 1])] - alone).abs().max() < 1e-4


@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_equal_megatron_local_layers(world, hf_dir, npu, impl):
    tokens = ids(2, SEQ, seed=2)
    grads = []
    for cfg in (None, FusedOpsConfig(**ALL_ON, force_impl=impl)):
        model = build(hf_dir, cfg).train()
        out = logits(model, tokens)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(3))).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        err = (grads[1][name] - g).abs().max() / g.abs().max()
        assert err < 1e-4, f"{name}: relative error {err:.2e}"


def test_segment_ids_equal_the_same_mask_given_as_bool(world, hf_dir, npu):
    seg = torch.tensor([[1] * 10 + [2] * 14, [1] * 20 + [0] * 4])
    tokens = ids(2, SEQ, seed=5)
    with torch.no_grad():
        by_segments = logits(build(hf_dir, FusedOpsConfig(**ALL_ON, force_impl="npu")), tokens, attention_mask=seg)
        by_mask = logits(build(hf_dir, FusedOpsConfig(**ALL_ON, force_impl="reference")), tokens,
                         attention_mask=segment_mask(seg))
        causal = logits(build(hf_dir, FusedOpsConfig(**ALL_ON, force_impl="reference")), tokens)
    assert (by_segments - by_mask).abs().max() < 1e-4
    assert (by_segments[0, :10] - causal[0, :10]).abs().max() < 1e-4  # the first segment sees the same keys
    assert (by_segments[0, 10:] - causal[0, 10:]).abs().max() > 1e-2  # the second does not see the first


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_cross_entropy_on_the_final_hidden_states_equals_megatrons_loss(world, hf_dir, impl):
    """The wiring a training loop uses: the decoder's output (final norm applied; GPTModel returns it when
    post_process is off) and the output weight, against GPTModel's own per-token loss for the same labels."""
    model = build(hf_dir, FusedOpsConfig(**ALL_ON, force_impl="reference"))
    tokens, labels = ids(2, SEQ, seed=6), ids(2, SEQ, seed=7)
    pos = torch.arange(SEQ).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        expected = model(tokens, pos, None, labels=labels)
        model.post_process = False
        try:
            hidden = model(tokens, pos, None)
        finally:
            model.post_process = True
        weight = (model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights
                  else model.output_layer.weight)
        loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=7, force_impl=impl)
    assert hidden.shape == (SEQ, 2, 64) and loss.shape == expected.shape == (2, SEQ)
    torch.testing.assert_close(loss, expected.float(), atol=1e-5, rtol=1e-5)


def test_hook_keeps_megatron_classes_a_config_cannot_use(world, hf_dir, caplog):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.attention import SelfAttention

    arch = ModelArch.from_hf_config(read_hf_config(hf_dir), hf_dir)
    config = build_transformer_config(arch, ParallelOptions(), ModelOptions())
    config.rotary_interleaved = True
    spec = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    with caplog.at_level(logging.INFO, logger="mindspeed_lora.ops"):
        out = fused_ops_spec_hook(FusedOpsConfig(**ALL_ON))(spec, arch, config)
    assert out.submodules.self_attention.module is SelfAttention
    assert out.submodules.mlp.module is layers.FusedSwiGLUMLP
    assert spec.submodules.mlp.module is not layers.FusedSwiGLUMLP  # the input spec is left alone
    assert any("rope (interleaved rotary)" in r.getMessage() for r in caplog.records)


def test_flags_make_the_config():
    parser = build_parser("posttrain_gpt")
    args = parser.parse_args(["--use-fused-rmsnorm", "--no-use-flash-attn"])
    assert fused_ops_config(args, "cpu") == FusedOpsConfig(use_fused_rmsnorm=True)
    assert fused_ops_config(args, "npu") == FusedOpsConfig(use_fused_rmsnorm=True, use_fused_swiglu=True,
                                                           use_fused_rotary_pos_emb=True, use_flash_attn=False)
    assert fused_ops_config(parser.parse_args([]), "cuda") == FusedOpsConfig(**ALL_ON)
    inference_args = build_parser("inference").parse_args(["--load", "ckpt", "--use-fused-swiglu"])
    assert fused_ops_config(inference_args, "cpu").enabled == ["use_fused_swiglu"]
    with pytest.raises(ValueError, match="force_impl"):
        FusedOpsConfig(force_impl="triton")
