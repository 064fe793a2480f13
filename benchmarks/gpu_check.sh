#!/usr/bin/env bash
# The GPU checks in one go (see benchmarks/gpu_check.py): family parity on CUDA, bf16 LoRA step and
# inference at 2,048 tokens with MFU, peak memory with/without gradient checkpointing, a 1-fold
# finetune of the example on cuda, torchrun with NCCL. Writes docs/gpu_check.json and its section of
# docs/benchmarks.md. --dry-run: the same on the CPU at tiny sizes (the commands parsed, not run).
#   bash benchmarks/gpu_check.sh [--dry-run] [--out DIR] [--md FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 python benchmarks/gpu_check.py "$@"
