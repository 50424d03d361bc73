#!/usr/bin/env bash
# The GPU path on a CUDA machine (about 5-10 minutes on one GPU): the demo described with vLLM on the GPU,
# features and train in bf16 (DDP over the visible GPUs), evaluate; each stage's throughput, and where the
# results differ from a CPU run of the same config, and why (benchmarks/gpu_check.py says what it runs).
# Without a CUDA GPU it prints "SKIPPED: ..." and exits 0. Needs this project installed with the CUDA
# vllm extra (pip install -e ".[vllm]"); without vLLM, describe is skipped with the reason and the rest runs.
#   bash scripts/gpu-check.sh [--work DIR] [--nproc N] [--rehearse-on-cpu]
set -euo pipefail
cd "$(dirname "$0")/.."
python=".venv/bin/python"
[ -x "$python" ] || python="$(command -v python3)"
exec "$python" benchmarks/gpu_check.py "$@"
