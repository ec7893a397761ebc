#!/usr/bin/env bash
# On a CUDA machine (after scripts/setup.sh): the GPU-only tests, then the trainer benchmark on the GPU.
#   scripts/gpu_check.sh [--model-path DIR]      # default model: SmolLM2-135M-Instruct from the set-up cache
# Writes benchmark/results/gpu/train_throughput.json (+ .png) and prints the device, model and figures.
set -Eeuo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python=".venv/bin/python"
[ -x "$python" ] || python="python3"
"$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: nothing to check")'
"$python" -c 'import torch; print("[gpu_check] device:", torch.cuda.get_device_name(0), "torch", torch.__version__)'
echo "[gpu_check] GPU tests"
"$python" -m pytest test/test_gpu.py -m gpu -q
echo "[gpu_check] trainer benchmark on the GPU (bf16)"
mkdir -p benchmark/results/gpu
"$python" benchmark/train_throughput.py --output benchmark/results/gpu/train_throughput.json \
    --fit-lengths 512,1024,2048,4096 --budget-mb 4096 "$@"
