#!/bin/bash
# Alpaca-style instruction data -> Megatron indexed dataset for LoRA / full SFT of Mistral-7B-Instruct-v0.3.
# Writes ${OUTPUT_PREFIX}_packed_{input_ids,attention_mask,labels}_document.{bin,idx}; give the bare
# OUTPUT_PREFIX to the tune scripts as DATA_PATH. ShareGPT data: --handler-name SharegptStyleInstructionHandler.

INPUT=${INPUT:-"your data path"}                  # .json / .jsonl / .parquet file, or a directory of them
TOKENIZER_PATH=${TOKENIZER_PATH:-"your tokenizer path"}   # the HF model directory
OUTPUT_PREFIX=${OUTPUT_PREFIX:-"your output prefix"}      # e.g. ./finetune_dataset/alpaca
SEQ_LENGTH=${SEQ_LENGTH:-4096}                    # longer samples are dropped (and counted in the summary)
WORKERS=${WORKERS:-8}

source "$(dirname "$0")/../launch.sh"
require_paths INPUT TOKENIZER_PATH OUTPUT_PREFIX
mkdir -p "$(dirname "$OUTPUT_PREFIX")"

launch_single data_convert_mistral_7b_instruction preprocess_data.py \
    --input "$INPUT" \
    --tokenizer-name-or-path "$TOKENIZER_PATH" \
    --output-prefix "$OUTPUT_PREFIX" \
    --handler-name AlpacaStyleInstructionHandler \
    --prompt-type mistral \
    --seq-length "$SEQ_LENGTH" \
    --workers "$WORKERS" \
    --log-interval 1000 \
    "$@"
