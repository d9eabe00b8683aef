#!/usr/bin/env bash
# Create (or reuse) .venv and install mindspeed_lora with its test extras, never upgrading an installed torch.
# Torch: an existing one is kept; otherwise the CPU build 2.13.0 is installed where a GPU/NPU is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==2.13.0"
fi
TORCH_PIN="torch==$(python -c 'import torch; print(torch.__version__.split("+")[0])')"
# The constraint keeps pip from replacing the torch we have (a CUDA or torch_npu build, or the CPU pin).
python -m pip install -q -e ".[test]" -c <(echo "$TORCH_PIN")
