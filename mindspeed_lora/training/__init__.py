"""Training: typed config from flags, model setup, the SFT loop, checkpoints and metrics."""
from __future__ import annotations


def run_from_args(args):
    """parse -> build -> run: what posttrain_gpt.py does."""
    from mindspeed_lora.parallel import shutdown
    from mindspeed_lora.training.config import training_config_from_args
    from mindspeed_lora.training.sft import run

    cfg = training_config_from_args(args)
    try:
        return run(cfg)
    finally:
        shutdown()
