#!/bin/bash
# Mistral-7B-Instruct-v0.3 base (Megatron) + LoRA adapter -> one merged HF model directory (W + scaling * B @ A in fp32,
# cast once to the base's dtype), loadable by transformers. Add --save-lora-to-hf to write a PEFT adapter
# directory instead (docs/lora.md).

CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-"your model ckpt path"}    # ckpt_convert_mistral_7b_hf2mcore.sh output
LORA_LOAD_DIR=${LORA_LOAD_DIR:-"your lora ckpt path"}     # CKPT_SAVE_DIR of tune_mistral_7b_4K_lora_ptd.sh
SAVE_DIR=${SAVE_DIR:-"your HF save path"}                  # written here (must be new or empty)

source "$(dirname "$0")/../launch.sh"
require_paths CKPT_LOAD_DIR LORA_LOAD_DIR SAVE_DIR

launch_single ckpt_convert_mistral_7b_mcore2hf_lora convert_ckpt.py \
    --load-model-type mg \
    --save-model-type hf \
    --model-type-hf mistral \
    --load-dir "$CKPT_LOAD_DIR" \
    --lora-load "$LORA_LOAD_DIR" \
    --save-dir "$SAVE_DIR" \
    "$@"
