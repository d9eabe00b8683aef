"""Evaluate a Megatron checkpoint (or HF dir), optionally with a LoRA adapter, on MMLU, C-Eval, CMMLU, BoolQ or
GSM8K in the layouts they are released in: per-subject and overall accuracy as JSON and a table. Launch with
torchrun for TP/DP."""
from mindspeed_lora.evaluation.runner import main

if __name__ == "__main__":
    main()
