#!/bin/bash
# Mistral-7B-Instruct-v0.3: HF safetensors -> Megatron checkpoint sharded for training (architecture read from config.json).
# The TP/PP layout must be the one the next step runs with: TP2 PP1 for tune_mistral_7b_4K_lora_ptd.sh,
# generate and evaluate (the default here); TP=4 PP=2 for tune_mistral_7b_4K_full_ptd.sh, e.g.
#   TP=4 PP=2 MCORE_DIR=./model_weights/mistral_7b_mcore_tp4pp2 bash examples/mcore/mistral/ckpt_convert_mistral_7b_hf2mcore.sh

HF_DIR=${HF_DIR:-"your HF model path"}             # config.json, *.safetensors, tokenizer files
MCORE_DIR=${MCORE_DIR:-"your mcore save path"}     # written here (must be new or empty)
TP=${TP:-2}
PP=${PP:-1}

source "$(dirname "$0")/../launch.sh"
require_paths HF_DIR MCORE_DIR

launch_single ckpt_convert_mistral_7b_hf2mcore convert_ckpt.py \
    --load-model-type hf \
    --save-model-type mg \
    --model-type-hf mistral \
    --load-dir "$HF_DIR" \
    --save-dir "$MCORE_DIR" \
    --target-tensor-parallel-size "$TP" \
    --target-pipeline-parallel-size "$PP" \
    --params-dtype bf16 \
    "$@"
