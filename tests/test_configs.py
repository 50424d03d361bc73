"""Every shipped experiment file validates (a typo in a preset would only show on a GPU run)."""
from pathlib import Path

import pytest

from leccr.config import load_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_validates(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
