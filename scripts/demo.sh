#!/usr/bin/env bash
# Set up, then run every stage of the pipeline on the generated demo data with tiny models (CPU, no server).
# The demo needs no extra: it runs configs/demo_scene.yaml (the generator's scene descriptions) after the
# tiny LLaVA has described every item with transformers (configs/demo.yaml), its tasks locally.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh ""
exec .venv/bin/leccr demo "$@"
