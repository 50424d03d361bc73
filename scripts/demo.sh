#!/usr/bin/env bash
# Set up, then run every stage of the pipeline on the generated demo data with tiny models (CPU, no server).
# The demo needs no extra: it describes with transformers and runs its tasks locally (configs/demo.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh ""
exec .venv/bin/leccr demo "$@"
