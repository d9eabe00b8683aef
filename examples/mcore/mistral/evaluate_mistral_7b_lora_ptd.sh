#!/bin/bash
# MMLU (5-shot, answer-letter logits) of Mistral-7B-Instruct-v0.3 plus a LoRA adapter on one node: TP2 x DP4, the questions
# split over the data-parallel ranks. Accuracy per subject and overall goes to EVAL_OUTPUT_DIR.

CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-"your model ckpt path"}    # ckpt_convert_mistral_7b_hf2mcore.sh output (TP2 PP1)
LORA_LOAD_DIR=${LORA_LOAD_DIR:-"your lora ckpt path"}     # CKPT_SAVE_DIR of tune_mistral_7b_4K_lora_ptd.sh
DATA_PATH=${DATA_PATH:-"your mmlu path"}                  # MMLU CSV layout: dev/ and test/ (docs/formats.md)
EVAL_OUTPUT_DIR=${EVAL_OUTPUT_DIR:-./eval_results/mistral_7b_lora}

TP=${TP:-2}
SEQ_LENGTH=${SEQ_LENGTH:-4096}

source "$(dirname "$0")/../launch.sh"
require_paths CKPT_LOAD_DIR LORA_LOAD_DIR DATA_PATH

launch_distributed evaluate_mistral_7b_lora evaluation.py \
    --load "$CKPT_LOAD_DIR" \
    --lora-load "$LORA_LOAD_DIR" \
    --tensor-model-parallel-size "$TP" \
    --task mmlu \
    --task-data-path "$DATA_PATH" \
    --num-shots 5 \
    --eval-method logits \
    --prompt-type mistral \
    --seq-length "$SEQ_LENGTH" \
    --micro-batch-size 4 \
    --bf16 \
    --eval-output-dir "$EVAL_OUTPUT_DIR" \
    "$@"
