"""Raw Alpaca / ShareGPT / OpenAI-messages / pairwise / pretraining data -> Megatron indexed datasets
(MindSpeed-LLM's preprocess_data.py flags and output names).

    python preprocess_data.py --input data.jsonl --tokenizer-name-or-path HF_DIR --output-prefix out/alpaca \
        --handler-name AlpacaStyleInstructionHandler --prompt-type qwen3 --seq-length 4096 --workers 8
"""
import sys

from mindspeed_lora.arguments import parse_args
from mindspeed_lora.errors import main_guard


@main_guard
def main(argv=None):
    from mindspeed_lora.data.preprocess import PreprocessConfig, run_preprocess

    try:
        run_preprocess(PreprocessConfig.from_args(parse_args("preprocess_data", argv)))
    except KeyboardInterrupt:
        print("preprocess_data: interrupted (outputs appear only when a run completes)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
