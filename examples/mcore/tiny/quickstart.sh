#!/usr/bin/env bash
# Quickstart: the whole pipeline on a tiny Qwen3-architecture model built here (random weights, a tokenizer
# trained here; nothing is downloaded). CPU: a few minutes on 2 cores; a GPU or NPU is used when present.
#
#   build model -> preprocess -> convert HF->Megatron -> LoRA SFT -> merge LoRA into HF -> generate -> evaluate
#
# The LoRA run teaches the model who it is (self-cognition data with MODEL_NAME / MODEL_AUTHOR filled in);
# at the end it answers "Who are you?" with MODEL_NAME. Outputs go to WORK (default outputs/quickstart).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$ROOT"
bash scripts/setup_env.sh
. .venv/bin/activate
export PYTHONWARNINGS=ignore

WORK=${WORK:-$ROOT/outputs/quickstart}
MODEL_NAME=${MODEL_NAME:-Tiny-Qwen}
MODEL_AUTHOR=${MODEL_AUTHOR:-MindSpeed-LoRA}
QUESTION=${QUESTION:-"Who are you?"}
TRAIN_ITERS=${TRAIN_ITERS:-200}
DATA=examples/mcore/tiny/data

# a re-run starts afresh: conversion refuses a non-empty target and training would resume from its --save
rm -rf "$WORK"/hf "$WORK"/data "$WORK"/mcore "$WORK"/lora "$WORK"/merged "$WORK"/eval "$WORK"/answers.jsonl
mkdir -p "$WORK"
step() { echo; echo "== $1  [${SECONDS}s]"; }

step "1/7 a tiny Qwen3 model (2 layers, hidden 64, vocab 512) and its tokenizer -> $WORK/hf"
# initializer_range 0.2 instead of the usual 0.02: at hidden size 64 the frozen random output layer would
# otherwise bound every logit near 1, and LoRA (which leaves that layer alone) could never make the answer likely
python -m mindspeed_lora.tiny --family qwen3 --out "$WORK/hf" --seed 0 --initializer-range 0.2

step "2/7 preprocess the demo data (self-cognition as $MODEL_NAME by $MODEL_AUTHOR, plus Alpaca) -> $WORK/data"
python preprocess_data.py \
    --input "$DATA/self_cognition.jsonl,$DATA/alpaca_demo.jsonl" \
    --tokenizer-name-or-path "$WORK/hf" \
    --output-prefix "$WORK/data/demo" \
    --handler-name AlpacaStyleInstructionHandler \
    --prompt-type qwen3 \
    --seq-length 256 \
    --model-name "$MODEL_NAME" \
    --model-author "$MODEL_AUTHOR" \
    --no-progress

step "3/7 convert HF -> Megatron checkpoint -> $WORK/mcore"
python convert_ckpt.py \
    --load-model-type hf \
    --save-model-type mg \
    --load-dir "$WORK/hf" \
    --save-dir "$WORK/mcore" \
    --target-tensor-parallel-size 1 \
    --target-pipeline-parallel-size 1 \
    --no-progress

step "4/7 LoRA SFT, $TRAIN_ITERS iterations of 16 samples -> $WORK/lora"
# a random model has everything to learn: a high learning rate and about 30 passes over the 100 samples
python posttrain_gpt.py \
    --stage sft \
    --load "$WORK/mcore" \
    --save "$WORK/lora" \
    --data-path "$WORK/data/demo" \
    --seq-length 256 \
    --variable-seq-lengths \
    --micro-batch-size 16 \
    --global-batch-size 16 \
    --train-iters "$TRAIN_ITERS" \
    --lr 1e-2 \
    --min-lr 1e-4 \
    --lr-decay-style cosine \
    --lr-warmup-iters 10 \
    --weight-decay 0.0 \
    --lora-r 16 \
    --lora-alpha 32 \
    --lora-target-modules linear_qkv linear_proj linear_fc1 linear_fc2 \
    --log-interval 20

step "5/7 merge the LoRA adapter into the base -> HF model $WORK/merged"
python convert_ckpt.py \
    --load-model-type mg \
    --save-model-type hf \
    --load-dir "$WORK/mcore" \
    --lora-load "$WORK/lora" \
    --save-dir "$WORK/merged" \
    --no-progress

step "6/7 generate with the merged HF model"
python -c "
import json, sys
with open('$WORK/questions.jsonl', 'w') as f:
    for q in sys.argv[1:]:
        f.write(json.dumps({'prompt': q}, ensure_ascii=False) + '\n')" \
    "$QUESTION" "What is your name?" "What is the capital of France?"
python inference.py \
    --load "$WORK/merged" \
    --prompt-type qwen3 \
    --task greedy \
    --input-file "$WORK/questions.jsonl" \
    --output-file "$WORK/answers.jsonl" \
    --max-new-tokens 48

step "7/7 evaluate on a small MMLU-layout exam (examples/mcore/tiny/mmlu; a tiny model scores near chance, 25%)"
python evaluation.py \
    --load "$WORK/merged" \
    --task mmlu \
    --task-data-path examples/mcore/tiny/mmlu \
    --num-shots 1 \
    --eval-output-dir "$WORK/eval"

echo
echo "== done in ${SECONDS}s"
python -c "
import json, sys
name = sys.argv[1]
rows = [json.loads(line) for line in open('$WORK/answers.jsonl')]
for r in rows:
    print(f'  Q: {r[\"prompt\"]}\n  A: {r[\"response\"]}')
print()
print('loss curve:    $WORK/lora/loss_curve.png')
print('merged model:  $WORK/merged')
print('exam results:  $WORK/eval/mmlu_accuracy.json')
if name in rows[0]['response']:
    print(f'the model learned its name: its answer to {rows[0][\"prompt\"]!r} names {name}')
else:
    sys.exit(f'the answer to {rows[0][\"prompt\"]!r} does not name {name}: training did not converge')
" "$MODEL_NAME"
