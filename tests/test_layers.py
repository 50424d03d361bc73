"""The layer rules of pyproject.toml ([tool.importlinter]), checked on every test run."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parents[1]


def test_import_contracts_are_kept():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint is not None, "import-linter is part of the test extra (scripts/test.sh installs it)"
    result = subprocess.run([lint], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout
