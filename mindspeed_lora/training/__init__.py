"""Training: typed config from flags, model setup, the SFT loop, checkpoints and metrics."""
from __future__ import annotations

import warnings


def run_from_args(args):
    """parse -> build -> run: what posttrain_gpt.py does."""
    # megatron-core warns that apex / Transformer Engine are absent (our spec never uses them) and about a
    # CUDA-graph default we do not use
    for message in (r".*(Apex|Transformer Engine).* (is|are) not installed", r"full scope is deprecated"):
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    from mindspeed_lora.errors import UserError
    from mindspeed_lora.parallel import shutdown

    if args.is_pairwise_dataset and args.stage not in ("dpo", "simpo"):
        raise UserError(f"--is-pairwise-dataset with --stage {args.stage}: pairwise (chosen / rejected) data trains "
                        "with --stage dpo")
    dpo_only = [flag for flag, value in (("--ref-load", args.ref_load), ("--refer-model-iter", args.refer_model_iter))
                if value is not None]
    if dpo_only and args.stage not in ("dpo", "simpo"):
        raise UserError(f"{' / '.join(dpo_only)} with --stage {args.stage}: these name DPO's reference model, which "
                        "--stage sft does not have; drop them, or train with --stage dpo")
    if args.stage in ("dpo", "simpo"):
        from mindspeed_lora.dpo.trainer import config_from_args, run
    else:
        from mindspeed_lora.training.config import training_config_from_args as config_from_args
        from mindspeed_lora.training.sft import run

    cfg = config_from_args(args)
    try:
        return run(cfg)
    finally:
        shutdown()
