"""Tiny models: they load through the Auto classes a user would use, run, and are deterministic."""
import hashlib
from pathlib import Path

import pytest
import torch

from leccr.tiny_models import build_all
from leccr.tiny_models.mt import build_mt
from leccr.tiny_models.text import build_text_encoder
from leccr.tiny_models.vision import build_vision

CORPUS = ["a red circle on a blue background", "ein roter Kreis auf blauem Hintergrund",
          "un cercle rouge sur un fond bleu", "蓝色背景上的红色圆圈", "a green square moves to the left",
          "ein grünes Quadrat bewegt sich nach links", "un carré vert se déplace vers la gauche"]


def _digest(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_all(tmp_path_factory.mktemp("tiny"), CORPUS, seed=0)


def test_text_encoder_loads_with_auto_classes_and_splits_chinese(models):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models["text_encoder"])
    model = AutoModel.from_pretrained(models["text_encoder"])
    batch = tokenizer(["a red circle", "红色圆圈"], padding=True, return_tensors="pt")
    assert tokenizer.convert_ids_to_tokens(tokenizer("红色圆圈")["input_ids"]) == ["[CLS]", "红", "色", "圆", "圈", "[SEP]"]
    assert tokenizer.decode(tokenizer("a red circle")["input_ids"], skip_special_tokens=True) == "a red circle"
    states = model(**batch).last_hidden_state
    assert states.shape == (2, batch["input_ids"].shape[1], 64)


def test_vision_tower_gives_17_tokens_of_width_64(models):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    processor = AutoImageProcessor.from_pretrained(models["vision"])
    model = AutoModel.from_pretrained(models["vision"])
    pixels = processor(images=[Image.new("RGB", (64, 48), "red")] * 2, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (2, 3, 32, 32)
    assert model(pixel_values=pixels).last_hidden_state.shape == (2, 17, 64)


def test_mt_model_generates_with_language_tokens(models):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models["mt"])
    model = AutoModelForSeq2SeqLM.from_pretrained(models["mt"])
    assert ">>de<<" in tokenizer.get_vocab()
    encoded = tokenizer([">>de<< a red circle"], return_tensors="pt")
    assert encoded["input_ids"][0, 0] == tokenizer.convert_tokens_to_ids(">>de<<")  # one token, not split
    out = model.generate(**encoded, max_new_tokens=5, do_sample=False)
    assert out.shape[0] == 1 and 1 < out.shape[1] <= 6
    assert isinstance(tokenizer.decode(out[0], skip_special_tokens=True), str)


def test_builds_are_deterministic_by_seed_and_idempotent(models, tmp_path):
    again = build_text_encoder(tmp_path / "t0", CORPUS, seed=0)
    assert _digest(again) == _digest(models["text_encoder"])
    assert _digest(build_text_encoder(tmp_path / "t1", CORPUS, seed=1)) != _digest(models["text_encoder"])
    assert _digest(build_vision(tmp_path / "v0", seed=0)) == _digest(models["vision"])
    assert _digest(build_mt(tmp_path / "m0", CORPUS, seed=0)) == _digest(models["mt"])
    stamp = (again / "model.safetensors").stat().st_mtime_ns
    build_text_encoder(again, CORPUS, seed=0)  # complete folder: nothing rebuilt
    assert (again / "model.safetensors").stat().st_mtime_ns == stamp
    assert not list(tmp_path.glob(".*tmp-*"))
    assert set(models) == {"text_encoder", "vision", "mt", "llava"}
