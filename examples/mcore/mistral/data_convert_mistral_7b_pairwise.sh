#!/bin/bash
# Preference pairs (Alpaca-style: instruction, input, chosen, rejected) -> Megatron indexed dataset for
# DPO of Mistral-7B-Instruct-v0.3 (posttrain_gpt.py --stage dpo). Writes
# ${OUTPUT_PREFIX}_packed_{chosen,rejected}_{input_ids,labels}_document.{bin,idx}.

INPUT=${INPUT:-"your data path"}                  # .json / .jsonl / .parquet file, or a directory of them
TOKENIZER_PATH=${TOKENIZER_PATH:-"your tokenizer path"}   # the HF model directory
OUTPUT_PREFIX=${OUTPUT_PREFIX:-"your output prefix"}      # e.g. ./pairwise_dataset/dpo
SEQ_LENGTH=${SEQ_LENGTH:-4096}
WORKERS=${WORKERS:-8}

source "$(dirname "$0")/../launch.sh"
require_paths INPUT TOKENIZER_PATH OUTPUT_PREFIX
mkdir -p "$(dirname "$OUTPUT_PREFIX")"

launch_single data_convert_mistral_7b_pairwise preprocess_data.py \
    --input "$INPUT" \
    --tokenizer-name-or-path "$TOKENIZER_PATH" \
    --output-prefix "$OUTPUT_PREFIX" \
    --handler-name AlpacaStylePairwiseHandler \
    --prompt-type mistral \
    --seq-length "$SEQ_LENGTH" \
    --workers "$WORKERS" \
    --log-interval 1000 \
    "$@"
