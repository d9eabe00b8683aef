"""Reporting and rope positions: FLOP counts, the log line, TensorBoard scalars, the loss-curve PNG."""
import os

import torch

from mindspeed_lora.models.arch import ModelArch
from mindspeed_lora.training import metrics


def _arch(**kw):
    base = dict(family="qwen3", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                num_query_groups=2, kv_channels=32, vocab_size=512, max_position_embeddings=256, norm_eps=1e-6,
                rope_theta=1e6, tie_word_embeddings=False)
    base.update(kw)
    return ModelArch(**base)


def test_matmul_params_equal_the_linear_weights_of_the_hf_model():
    from mindspeed_lora import tiny

    hf = tiny.build_hf_model("qwen3")
    linear = sum(m.weight.numel() for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear))
    assert metrics.matmul_params(_arch()) == linear


def test_train_flops_full_is_6n_lora_4n_plus_three_attention_forwards():
    a = _arch()
    n = metrics.matmul_params(a)
    attn = 2 * a.num_layers * a.num_attention_heads * a.kv_channels * (10 ** 2 + 6 ** 2)
    assert metrics.train_flops(a, [10, 6], lora=False) == 6 * n * 16 + 3 * attn
    assert metrics.train_flops(a, [10, 6], lora=True) == 4 * n * 16 + 3 * attn


def test_log_line_has_megatron_fields():
    stats = metrics.IntervalStats()
    stats.add(0.5, 1000, 2e12, 2.0, False)
    stats.add(0.5, 1000, 2e12, 1.0, True)
    line = metrics.format_log_line(7, 10, 56, stats, 1e-4, 0.5, 8, 2, {"max_allocated": 2 * 1024 ** 3}, None)
    for part in ("iteration        7/      10", "consumed samples:           56",
                 "elapsed time per iteration (ms): 500.0", "learning rate: 1.000000E-04", "lm loss: 1.500000E+00",
                 "grad norm: 0.5000", "number of skipped iterations:   1", "tokens/s: 2000.0",
                 "TFLOP/s per device: 2.000", "mem GiB alloc/peak/reserved: 0.00/2.00/0.00"):
        assert part in line, (part, line)


def test_tensorboard_scalars_and_loss_curve(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = metrics.TensorBoardLog(str(tmp_path / "tb"))
    for i, v in enumerate([3.0, 2.5, 2.0], start=1):
        tb.scalars(i, {"lm loss": v, "grad-norm": None})
    tb.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("lm loss")] == [3.0, 2.5, 2.0]
    png = metrics.write_loss_curve(str(tmp_path / "out" / "curve.png"), [(1, 3.0), (2, 2.0)], [(2, 2.2)])
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path / "out") == ["curve.png"]


def test_positioned_rope_equals_megatron_rope_and_restarts_per_segment():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from mindspeed_lora.patches import apply_patches
    from mindspeed_lora.training.positions import PositionedRotaryEmbedding

    apply_patches()
    base = RotaryEmbedding(kv_channels=32, rotary_percent=1.0, rotary_base=10000, use_cpu_initialization=True)
    rope = PositionedRotaryEmbedding(base)
    assert torch.equal(rope(8), base(8))  # no positions: megatron's own
    rope.position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 0, 1, 2, 3, 0]])
    emb = rope(8)
    ref = base(8)  # [s, 1, 1, d]
    assert emb.shape == (8, 2, 1, 32)
    assert torch.equal(emb[:, 0], ref[:, 0])
    assert torch.equal(emb[3:7, 1], ref[0:4, 0]) and torch.equal(emb[7, 1], ref[0, 0])
