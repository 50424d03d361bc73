#!/usr/bin/env bash
# Set up, then run every stage of the pipeline on the generated demo data with tiny models (CPU, no server).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/leccr demo "$@"
