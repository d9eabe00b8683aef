#!/usr/bin/env bash
# Quickstart on a tiny Qwen3-architecture model built locally (random weights, a tokenizer trained here).
# Runs on CPU in minutes; uses a GPU/NPU when present.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$ROOT"
bash scripts/setup_env.sh
. .venv/bin/activate
export PYTHONWARNINGS=ignore
WORK=${WORK:-$ROOT/outputs/quickstart}
mkdir -p "$WORK"

echo "== 1. build a tiny Qwen3 model and tokenizer under $WORK/hf"
python -m mindspeed_lora.tiny --family qwen3 --out "$WORK/hf"

echo "== 2. megatron-core vs HF transformers on the same weights (logit parity)"
python -m mindspeed_lora.checkpoint.precision --hf-dir "$WORK/hf"
