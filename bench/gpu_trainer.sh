#!/usr/bin/env bash
# LoRA/QLoRA training speed and peak memory on a bare CUDA host (torch, transformers and peft only;
# no network; no model folder). Builds SmolLM2-135M's and a Llama-3.1-8B-shaped model from their
# configs with random weights (speed and memory do not depend on the values); see gpu_trainer.py.
# Prints one JSON line per run and writes $OUT/gpu_trainer.json when OUT is set.
#   bash bench/gpu_trainer.sh                       # both models, batch 8 x 512 tokens, 10 timed steps
#   bash bench/gpu_trainer.sh --models smollm2 --steps 20
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c 'import torch, transformers, peft; print("torch", torch.__version__, "cuda", torch.version.cuda, "| transformers", transformers.__version__, "| peft", peft.__version__)'
exec "$PY" bench/gpu_trainer.py "$@"
