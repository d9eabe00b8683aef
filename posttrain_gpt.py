"""Post-training of GPT models on megatron-core (MindSpeed-LLM's posttrain_gpt.py flags): --stage sft.

    torchrun --nproc-per-node N posttrain_gpt.py --stage sft --load MODEL --data-path PREFIX ...
"""
from mindspeed_lora.arguments import parse_args
from mindspeed_lora.errors import main_guard


@main_guard
def main(argv=None):
    from mindspeed_lora.training import run_from_args

    run_from_args(parse_args("posttrain_gpt", argv))


if __name__ == "__main__":
    main()
