#!/bin/bash
# Full-parameter SFT of Mistral-7B-Instruct-v0.3 at 4K tokens on one node of 8 NPUs (or GPUs): TP4 x PP2, sequence
# parallelism, full activation recomputation, and Adam state sharded over data-parallel ranks (which
# grow with NNODES; docs/multinode.md). The architecture comes from the checkpoint.

CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-"your model ckpt path"}    # ckpt_convert_mistral_7b_hf2mcore.sh with TP=4 PP=2
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-"your model save path"}
DATA_PATH=${DATA_PATH:-"your data path"}                  # OUTPUT_PREFIX of data_convert_mistral_7b_instruction.sh

TP=${TP:-4}
PP=${PP:-2}
SEQ_LENGTH=${SEQ_LENGTH:-4096}
MBS=${MBS:-1}
GBS=${GBS:-64}
TRAIN_ITERS=${TRAIN_ITERS:-2000}
SAVE_INTERVAL=${SAVE_INTERVAL:-500}

source "$(dirname "$0")/../launch.sh"
require_paths CKPT_LOAD_DIR CKPT_SAVE_DIR DATA_PATH

launch_distributed tune_mistral_7b_4K_full posttrain_gpt.py \
    --stage sft \
    --load "$CKPT_LOAD_DIR" \
    --save "$CKPT_SAVE_DIR" \
    --data-path "$DATA_PATH" \
    --tensor-model-parallel-size "$TP" \
    --pipeline-model-parallel-size "$PP" \
    --sequence-parallel \
    --use-distributed-optimizer \
    --recompute-granularity full \
    --recompute-method uniform \
    --recompute-num-layers 1 \
    --seq-length "$SEQ_LENGTH" \
    --variable-seq-lengths \
    --micro-batch-size "$MBS" \
    --global-batch-size "$GBS" \
    --train-iters "$TRAIN_ITERS" \
    --lr 1e-5 \
    --min-lr 1e-7 \
    --lr-decay-style cosine \
    --lr-warmup-fraction 0.01 \
    --weight-decay 0.1 \
    --adam-beta2 0.95 \
    --clip-grad 1.0 \
    --bf16 \
    --seed 42 \
    --log-interval 1 \
    --save-interval "$SAVE_INTERVAL" \
    "$@"
