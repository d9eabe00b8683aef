"""Convert checkpoints: HF <-> Megatron (any TP/PP), Megatron resharding, LoRA merge, PEFT adapter export/import.

    python convert_ckpt.py --use-mcore-models --model-type GPT --load-model-type hf --save-model-type mg \\
        --load-dir HF_DIR --save-dir MG_DIR --target-tensor-parallel-size 2 --target-pipeline-parallel-size 2

One process; no torchrun. See docs/flags.md for every flag.
"""
import sys

from mindspeed_lora.arguments import parse_args
from mindspeed_lora.errors import main_guard


@main_guard
def main(argv=None):
    from mindspeed_lora.checkpoint.convert import run_from_args

    sys.exit(run_from_args(parse_args("convert_ckpt", argv)))


if __name__ == "__main__":
    main()
