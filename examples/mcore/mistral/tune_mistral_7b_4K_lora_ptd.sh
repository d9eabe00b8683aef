#!/bin/bash
# LoRA SFT of Mistral-7B-Instruct-v0.3 at 4K tokens on one node of 8 NPUs (or GPUs): TP2 x DP4 with sequence parallelism.
# The architecture comes from the checkpoint; only the run's settings are here. Multi-node: set NNODES,
# NODE_RANK, MASTER_ADDR (docs/multinode.md). Writes adapter-only checkpoints and loss_curve.png to CKPT_SAVE_DIR.

CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-"your model ckpt path"}    # ckpt_convert_mistral_7b_hf2mcore.sh output (TP2 PP1)
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-"your lora save path"}
DATA_PATH=${DATA_PATH:-"your data path"}                  # OUTPUT_PREFIX of data_convert_mistral_7b_instruction.sh

TP=${TP:-2}
PP=${PP:-1}
SEQ_LENGTH=${SEQ_LENGTH:-4096}
MBS=${MBS:-1}
GBS=${GBS:-64}
TRAIN_ITERS=${TRAIN_ITERS:-2000}
SAVE_INTERVAL=${SAVE_INTERVAL:-500}

source "$(dirname "$0")/../launch.sh"
require_paths CKPT_LOAD_DIR CKPT_SAVE_DIR DATA_PATH

# --lora-fusion (CCLoRA) overlaps the adapters' matmuls with the TP collectives (docs/lora.md)
launch_distributed tune_mistral_7b_4K_lora posttrain_gpt.py \
    --stage sft \
    --load "$CKPT_LOAD_DIR" \
    --save "$CKPT_SAVE_DIR" \
    --data-path "$DATA_PATH" \
    --tensor-model-parallel-size "$TP" \
    --pipeline-model-parallel-size "$PP" \
    --sequence-parallel \
    --seq-length "$SEQ_LENGTH" \
    --variable-seq-lengths \
    --micro-batch-size "$MBS" \
    --global-batch-size "$GBS" \
    --train-iters "$TRAIN_ITERS" \
    --lr 1e-4 \
    --min-lr 1e-6 \
    --lr-decay-style cosine \
    --lr-warmup-fraction 0.01 \
    --weight-decay 0.0 \
    --adam-beta2 0.95 \
    --clip-grad 1.0 \
    --bf16 \
    --lora-r 16 \
    --lora-alpha 32 \
    --lora-target-modules linear_qkv linear_proj linear_fc1 linear_fc2 \
    --seed 42 \
    --log-interval 1 \
    --save-interval "$SAVE_INTERVAL" \
    "$@"
