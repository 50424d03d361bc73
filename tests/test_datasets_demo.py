"""The generated demo dataset: read back through the multi30k adapter, pixels match captions, deterministic."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from leccr.datasets import load_dataset
from leccr.datasets.demo import (
    COLOURS,
    NUM_IMAGES,
    NUM_VIDEOS,
    POSITIONS,
    SIZE,
    VIDEO_FRAMES,
    DemoItem,
    demo_corpus,
    generate_demo,
    mt_noise,
    noun_phrase,
    plan_items,
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return generate_demo(tmp_path_factory.mktemp("demo") / "data", seed=0)


@pytest.fixture(scope="module")
def tables(demo):
    return load_dataset("multi30k", demo, ["de", "fr", "zh"], {})


def folder_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def test_demo_reads_through_the_multi30k_adapter(demo, tables):
    items = tables.items.to_pylist()
    assert len(items) == NUM_IMAGES + NUM_VIDEOS == 84
    assert Counter((i["split"], i["media_type"]) for i in items) == {
        ("train", "image"): 36,
        ("val", "image"): 12,
        ("test", "image"): 12,
        ("train", "video"): 14,
        ("val", "video"): 5,
        ("test", "video"): 5,
    }
    assert all(i["path"].startswith("images/") and (demo / i["path"]).is_file() for i in items)
    assert all(i["path"].endswith(".mp4") == (i["media_type"] == "video") for i in items)
    caption_rows = tables.captions.to_pylist()
    counts = Counter((c["split"], c["lang"], c["kind"]) for c in caption_rows)
    for split, n in (("train", 50), ("val", 17), ("test", 17)):
        assert counts[(split, "en", "human")] == 5 * n  # five English captions per item
    for lang in ("de", "fr", "zh"):
        assert counts[("train", lang, "mt")] == 250 and counts[("val", lang, "mt")] == 85
        assert counts[("test", lang, "human")] == 17 and counts[("test", lang, "mt")] == 0
    # every train/val English caption has an MT caption with its id in each language (what translate imports)
    english = {c["caption_id"] for c in caption_rows if c["lang"] == "en" and c["split"] != "test"}
    for lang in ("de", "fr", "zh"):
        assert {c["caption_id"] for c in caption_rows if c["lang"] == lang and c["kind"] == "mt"} == english
    # test references translate English caption 0 of their item
    refs = [c for c in caption_rows if c["kind"] == "human" and c["lang"] != "en"]
    assert {c["caption_id"] for c in refs} == {f"{i['item_id']}#enc#0" for i in items if i["split"] == "test"}


def test_captions_describe_the_pixels(demo, tables):
    plan = {item.item_id: item for item in plan_items(0)}
    english = {(c["item_id"], c["caption_id"]): c["text"] for c in tables.captions.to_pylist() if c["lang"] == "en"}
    checked = 0
    for item in plan.values():
        colour, shape, where = item.objects[0]
        assert english[(item.item_id, f"{item.item_id}#enc#0")].startswith(noun_phrase("en", colour, shape))
        if item.kind != "one":
            continue
        pixels = np.asarray(Image.open(demo / "images" / item.file_name).convert("RGB"))
        fx, fy = POSITIONS[where]
        # the shape's centre (inside every shape we draw) has exactly the caption's colour
        assert tuple(pixels[int(fy * SIZE), int(fx * SIZE)]) == COLOURS[colour], item
        checked += 1
    assert checked >= 40


def _centroid(frame: np.ndarray, rgb: tuple[int, int, int]) -> tuple[float, float]:
    close = np.abs(frame.astype(int) - np.array(rgb)).sum(axis=2) < 90  # H.264 shifts colours a little
    ys, xs = np.nonzero(close)
    return float(xs.mean()), float(ys.mean())


def test_videos_move_as_captioned(demo):
    for item in [i for i in plan_items(0) if i.kind == "video"]:
        colour, shape, motion = item.objects[0]
        with av.open(str(demo / "images" / item.file_name)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == VIDEO_FRAMES and frames[0].shape == (SIZE, SIZE, 3)
        (x0, y0), (x1, y1) = _centroid(frames[0], COLOURS[colour]), _centroid(frames[-1], COLOURS[colour])
        dx, dy = {"left_to_right": (1, 0), "right_to_left": (-1, 0), "top_to_bottom": (0, 1), "bottom_to_top": (0, -1)}[
            motion
        ]
        # the shape travels 70% of the frame (from 0.15 to 0.85) in the captioned direction
        assert (x1 - x0) * dx + (y1 - y0) * dy > 0.5 * SIZE, (item, x0, y0, x1, y1)


def test_translations_follow_the_templates():
    item = DemoItem("img9999", "one", "beach", [("red", "circle", "left")])
    assert item.captions("en")[0] == "a red circle on the left"
    assert item.captions("de")[0] == "ein roter Kreis links"
    assert item.captions("fr")[0] == "un cercle rouge à gauche"
    assert item.captions("zh")[0] == "一个红色的圆形在左边"
    assert (
        DemoItem("v", "video", "snow", [("orange", "star", "top_to_bottom")]).captions("fr")[0]
        == "une étoile orange se déplace de haut en bas"
    )
    assert noun_phrase("en", "orange", "square") == "an orange square"
    assert noun_phrase("de", "white", "square") == "ein weißes Quadrat"


def test_mt_noise_drops_or_swaps_one_word():
    import random

    text = "ein roter Kreis links an einem Strand"
    outputs = [mt_noise(text, "de", random.Random(seed)) for seed in range(200)]
    changed = [o for o in outputs if o != text]
    assert 0.1 < len(changed) / len(outputs) < 0.4  # a little noise, as in MT training captions
    for out in changed:
        words, original = out.split(), text.split()
        assert len(words) == len(original) - 1 or sorted(words) == sorted(original)


def test_demo_is_deterministic_and_skips_when_present(tmp_path, demo):
    again = generate_demo(tmp_path / "again", seed=0)
    assert folder_digest(again) == folder_digest(demo)
    other = generate_demo(tmp_path / "other", seed=1)
    assert folder_digest(other) != folder_digest(demo)
    before = {p: p.stat().st_mtime_ns for p in again.rglob("*") if p.is_file()}
    assert generate_demo(again, seed=0) == again  # complete: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in again.rglob("*") if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_incomplete_folder_is_not_taken_for_a_demo(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "images").mkdir()
    with pytest.raises(FileExistsError, match="is not a complete demo dataset"):
        generate_demo(tmp_path / "half")


def test_demo_corpus_has_every_language(demo, tables):
    corpus = demo_corpus(demo)
    assert len(corpus) == tables.captions.num_rows
    assert "a red circle on the left" in corpus or any("circle" in t for t in corpus)
    assert any("Kreis" in t or "Quadrat" in t for t in corpus)
    assert any("cercle" in t or "carré" in t for t in corpus)
    assert any("形" in t for t in corpus)


def test_scene_descriptions_say_what_was_drawn_in_every_view_without_copying_a_caption():
    from leccr.datasets.demo import (
        HEADINGS,
        PLACES,
        SCENE_DESCRIPTIONS_LABEL,
        SETTINGS,
        scene_descriptions,
        shuffled_across_items,
    )
    from leccr.prompts import default_views

    written = scene_descriptions(seed=0)
    assert written["model"] == SCENE_DESCRIPTIONS_LABEL
    items = plan_items(0)
    assert set(written["descriptions"]) == {item.item_id for item in items}
    for item in items:
        views = written["descriptions"][item.item_id]
        assert list(views) == list(default_views("video" if item.kind == "video" else "image"))
        text = " ".join(views.values())
        for colour, shape, where in item.objects:  # objects, colours, positions or motion, the setting
            assert f"{colour} {shape}" in text
            said = {"video": HEADINGS, "two": {"left": "at left", "right": "at right"}}.get(item.kind, PLACES)[where]
            assert said in text
        assert SETTINGS[item.scene][0] in views["scene"]
        captions = [c.lower() for lang in ("en", "de", "fr", "zh") for c in item.captions(lang)]
        assert not [c for c in captions for view in views.values() if c in view.lower()], item.item_id
    assert scene_descriptions(seed=0) == written and scene_descriptions(seed=1) != written
    shuffled = shuffled_across_items(written, seed=0)
    assert shuffled["model"].startswith(SCENE_DESCRIPTIONS_LABEL)
    assert sorted(map(str, shuffled["descriptions"].values())) == sorted(map(str, written["descriptions"].values()))
    assert all(shuffled["descriptions"][i] != written["descriptions"][i] for i in written["descriptions"])
