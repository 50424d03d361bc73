"""Every shipped experiment file validates (a typo in a preset would only show on a GPU run)."""
from pathlib import Path

import pytest

from leccr.config import load_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_validates(path):
    cfg = load_config(path)
    assert cfg.name == path.stem


# Each benchmark preset trains with METHOD.md's row for its dataset and language (VATEX has none of its
# own: the video row), the video datasets with the video models, and stores its features in float16
# (half the bytes; no ranking changed at the real dimensions: benchmarks/bench_real_dims.py).
PRESET_ROWS = {"multi30k_de": ("multi30k-de", "image"), "multi30k_fr": ("multi30k-fr", "image"),
               "multi30k_cs": ("multi30k-cs", "image"), "mscoco_zh": ("mscoco-zh", "image"),
               "mscoco_ja": ("mscoco-ja", "image"), "msrvtt_cn": ("msrvtt-cn", "video"),
               "vatex_zh": ("msrvtt-cn", "video")}


@pytest.mark.parametrize("name", sorted(PRESET_ROWS))
def test_benchmark_presets_train_their_rows_settings_on_float16_features(name):
    cfg = load_config(Path(__file__).parents[1] / "configs" / f"{name}.yaml")
    row, modality = PRESET_ROWS[name]
    assert (cfg.train.preset, cfg.train.modality) == (row, modality)
    assert cfg.train.resolved_epochs == {"multi30k-fr": 70, "mscoco-zh": 70}.get(row, 50)
    assert (cfg.features.visual_dtype, cfg.features.states_dtype) == ("float16", "float16")
