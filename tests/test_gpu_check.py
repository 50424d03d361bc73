"""scripts/gpu-check.sh where no CUDA GPU is visible: one clear SKIPPED line, exit 0, nothing run or written.
(The GPU path itself runs only on a CUDA machine: docs/performance.md, "The GPU check".)"""
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).parents[1]


def test_gpu_check_skips_without_cuda(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TMPDIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu-check.sh")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("SKIPPED: gpu-check needs a CUDA GPU, and torch ")
    assert lines[0].endswith("Nothing was run.")
    assert list(tmp_path.iterdir()) == []  # no work folder, no demo built
