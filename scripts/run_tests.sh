#!/usr/bin/env bash
# The README's test command: sets up .venv, then runs the whole suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
export MINDSPEED_LORA_DEVICE=cpu PYTHONWARNINGS=ignore
ruff check .
python -m pytest -q tests "$@"
