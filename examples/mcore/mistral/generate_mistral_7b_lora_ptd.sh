#!/bin/bash
# Chat-formatted generation with Mistral-7B-Instruct-v0.3 plus a LoRA adapter, without merging it: the base checkpoint and
# the adapter are loaded side by side on TP2 (2 devices). The layouts of both must equal TP.

CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-"your model ckpt path"}    # ckpt_convert_mistral_7b_hf2mcore.sh output (TP2 PP1)
LORA_LOAD_DIR=${LORA_LOAD_DIR:-"your lora ckpt path"}     # CKPT_SAVE_DIR of tune_mistral_7b_4K_lora_ptd.sh
PROMPT=${PROMPT:-"Give three tips for staying healthy."}

NPUS_PER_NODE=${NPUS_PER_NODE:-${GPUS_PER_NODE:-2}}
TP=${TP:-2}
SEQ_LENGTH=${SEQ_LENGTH:-4096}                            # prompt + answer; sizes the KV cache
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-256}

source "$(dirname "$0")/../launch.sh"
require_paths CKPT_LOAD_DIR LORA_LOAD_DIR

launch_distributed generate_mistral_7b_lora inference.py \
    --load "$CKPT_LOAD_DIR" \
    --lora-load "$LORA_LOAD_DIR" \
    --tensor-model-parallel-size "$TP" \
    --prompt-type mistral \
    --task greedy \
    --prompt "$PROMPT" \
    --seq-length "$SEQ_LENGTH" \
    --max-new-tokens "$MAX_NEW_TOKENS" \
    --micro-batch-size 1 \
    --bf16 \
    --seed 42 \
    "$@"
