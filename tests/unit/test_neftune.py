"""NEFTune's hook: uniform noise of half-width alpha / sqrt(L*d) in training, nothing in evaluation."""
import math

import pytest
import torch

from mindspeed_lora.training.neftune import NEFTuneHook, noise_half_width


class Embedding(torch.nn.Module):
    def forward(self, x):
        return x


def test_noise_is_uniform_within_the_width_in_training_only():
    module = Embedding()
    module.register_forward_hook(NEFTuneHook(alpha=5.0, sequence_parallel=False, tp_size=2))
    x = torch.randn(64, 3, 32, dtype=torch.float64)
    torch.manual_seed(0)
    noise = module(x) - x
    width = 5.0 / math.sqrt(64 * 32)
    assert noise_half_width(5.0, 64, 32) == pytest.approx(width)
    assert noise.abs().max() <= width and noise.abs().max() > 0.99 * width
    assert abs(noise.mean()) < 0.02 * width and noise.std() == pytest.approx(width / math.sqrt(3), rel=0.05)
    torch.manual_seed(0)
    assert torch.equal(module(x) - x, noise)  # the default generator: the same on every TP rank
    module.eval()
    assert torch.equal(module(x), x)
