"""Saved weights are readable by others: safetensors 0.8 writes its files 0600."""

import stat
from pathlib import Path

from leccr.models import create_model_from_config, get_model_config
from leccr.tiny_models.text import build_text_encoder
from leccr.training.checkpoint import save_model

CORPUS = ["a red circle on a blue background", "ein roter Kreis auf blauem Hintergrund"]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_tiny_model_and_checkpoint_weights_are_as_readable_as_their_config(tmp_path):
    text = build_text_encoder(tmp_path / "text", CORPUS)
    assert _mode(text / "model.safetensors") == _mode(text / "config.json")
    assert _mode(text / "model.safetensors") & stat.S_IROTH

    model = create_model_from_config(get_model_config("baseline-image-tiny"), text)
    method_dir = tmp_path / "baseline"
    method_dir.mkdir()
    weights = save_model(model, method_dir, "baseline")
    assert _mode(weights) == _mode(method_dir / "model.json") and _mode(weights) & stat.S_IROTH
