"""Every file a run depends on is keyed by content, and the digest cache that makes that cheap stays
cheap and sound: media outside the dataset folder, hard links made by the features stage, a garbled
cache file. Each case served stale output, reread every file or hashed silently forever before.
"""
import logging
import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import leccr.core.fingerprint as fingerprint
from leccr.config import parse_config
from leccr.core.artifact import damaged_files
from leccr.core.fingerprint import Fingerprinter, fingerprinter_for, hash_file
from leccr.core.driver import run_pipeline
from leccr.core.explain import explain
from tests.faults.test_faults import _copy, _test_items
from tests.faults.test_same_bytes import _small


def _by_item(folder: Path, column: str) -> dict:
    rows = [r for part in sorted(folder.glob("part-*.parquet")) for r in pq.read_table(part).to_pylist()]
    return {r["item_id"]: r[column] for r in rows}


# ------------------------------------------------------------------------------------------ outside media
def test_a_replaced_image_outside_the_dataset_folder_is_recomputed_alone(demo_root, tmp_path):
    """Multi30K as usually set up: the text repository in one folder, the Flickr30k images in another
    (`options.images: /data/flickr30k-images`)."""
    data = _copy(demo_root, tmp_path / "multi30k")
    images = Path(shutil.move(str(data / "images"), tmp_path / "flickr30k-images"))
    config = _small(demo_root, data, tmp_path / "artifacts")
    config["dataset"]["options"] = {"images": str(images)}
    cfg = parse_config(config)
    first = run_pipeline(cfg, ["describe", "visual"])
    described = first["describe"].artifact.manifest.summary["items"]
    encoded = first["visual"].artifact.manifest.summary["items"]

    name = next(n for n in _test_items(data)[:6] if n.endswith(".png"))  # a test item the capped dataset keeps
    item = name.split(".")[0]
    image = images / name
    size = Image.open(image).size
    noise = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(noise).save(image)  # another picture under the same name

    planned = {p.name: p for p in explain(cfg, ["describe", "visual"])}
    assert planned["dataset"].status == "miss"
    assert "dataset.outside_files.images: content changed" in planned["dataset"].reasons
    second = run_pipeline(cfg, ["describe", "visual"])
    assert not second["dataset"].cache_hit
    items = pq.read_table(second["dataset"].artifact.path / "items.parquet").to_pylist()
    digests = {r["item_id"]: r["media_digest"] for r in items}
    assert digests[item] == hash_file(image)  # the item's media digest is that of the new bytes
    assert second["describe"].artifact.manifest.summary["reuse"]["rows"] == {"computed": 1, "reused": described - 1}
    assert second["visual"].artifact.manifest.summary["reuse"]["rows"] == {"computed": 1, "reused": encoded - 1}
    before = _by_item(first["visual"].artifact.path, "features")
    after = _by_item(second["visual"].artifact.path, "features")
    assert after[item] != before[item]  # served features are those of the new picture ...
    assert {k: v for k, v in after.items() if k != item} == {k: v for k, v in before.items() if k != item}  # ... alone
    # Nothing changed since: every stage is a hit again.
    assert all(o.cache_hit for o in run_pipeline(cfg, ["describe", "visual"]).values())


def test_every_adapter_declares_the_options_that_name_files(tmp_path):
    """The options that are paths are marked as such; the rest (ids, extensions, flags) are not."""
    from leccr.datasets.base import get_adapter, list_formats, path_options

    marked = {fmt: set(path_options(get_adapter(fmt).Options)) for fmt in list_formats()}
    assert marked == {
        "multi30k": {"features", "images", "mt_pattern"},
        "mscoco": {"features", "karpathy", "images", "stair_files", "coco_cn_dir", "mt_pattern", "mt_id_map"},
        "vatex": {"features", "train_json", "validation_json", "split_lists", "videos", "mt_pattern"},
        "msrvtt_cn": {"features", "text_dir", "english_pattern", "chinese_pattern", "mt_pattern", "videos"},
    }
    # A pattern is filled as the adapter fills it: its splits, the configured languages.
    named = dict(get_adapter("mscoco").named_paths(tmp_path, {"mt_pattern": "/mt/{split}.{lang}",
                                                              "karpathy": "/k/coco.json"}, ["ja"]))
    assert named["karpathy"] == Path("/k/coco.json") and named["images"] == tmp_path / "images"
    assert {k: v for k, v in named.items() if k.startswith("mt_pattern")} == {
        f"mt_pattern[/mt/{split}.ja]": Path(f"/mt/{split}.ja") for split in ("train", "val", "test")}
    named = dict(get_adapter("msrvtt_cn").named_paths(tmp_path, {"text_dir": "/t", "splits": ["train"]}, ["zh"]))
    assert named["english_pattern[msrvtt10kcntrain.caption.txt]"] == Path("/t/msrvtt10kcntrain.caption.txt")


# ------------------------------------------------------------------------------------------ digest cache
def test_verifying_an_artifact_the_features_stage_linked_reads_nothing(demo_root, tmp_path, monkeypatch):
    # Files younger than RACY_SECONDS are not remembered across runs (git's racy rule); the demo's
    # stages finish within that, so the rule is off here to see what a run on older files sees.
    monkeypatch.setattr(fingerprint, "RACY_SECONDS", 0.0)
    cfg = parse_config(_small(demo_root, demo_root / "data", tmp_path / "artifacts"))
    outcomes = run_pipeline(cfg, ["features"])
    visual = outcomes["visual"].artifact
    linked = outcomes["features"].artifact.path / "visual"
    assert os.stat(linked / "part-00000.parquet").st_ino == os.stat(visual.path / "part-00000.parquet").st_ino

    fingerprints = fingerprinter_for(cfg.artifacts_root)  # the next run's
    assert damaged_files(visual.path, visual.manifest, fingerprints) == {}
    assert fingerprints.hashed_bytes == 0
    # Change detection is as strict as before: a rewritten shard is read and found out.
    shard = visual.path / "part-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    fingerprints = fingerprinter_for(cfg.artifacts_root)
    assert "part-00000.parquet has other content" in damaged_files(visual.path, visual.manifest, fingerprints)[
        "part-00000.parquet"]
    assert fingerprints.hashed_bytes == len(data)


def _files(tmp_path: Path) -> Path:
    folder = tmp_path / "files"
    folder.mkdir()
    for index in range(40):
        (folder / f"f{index:02d}").write_bytes(os.urandom(4096))
    return folder


def _corrupt(cache: Path) -> None:
    """Overwrite every page but the first (the header and schema) with noise, as a bad copy would."""
    data = bytearray(cache.read_bytes())
    page = 4096
    data[page:] = os.urandom(len(data) - page)
    cache.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["not a database", "corrupt pages"])
def test_a_garbled_digest_cache_is_named_moved_aside_and_made_afresh(tmp_path, caplog, monkeypatch, damage):
    monkeypatch.setattr(fingerprint, "RACY_SECONDS", 0.0)
    folder = _files(tmp_path)
    cache = tmp_path / ".cache" / "digests.sqlite"
    Fingerprinter(cache).path(folder)
    for index in range(400):  # enough rows for pages to damage past the schema
        (tmp_path / "more").mkdir(exist_ok=True)
        (tmp_path / "more" / f"m{index:03d}").write_bytes(b"%d" % index)
    Fingerprinter(cache).path(tmp_path / "more")
    with sqlite3.connect(cache) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every row in the main file, none in the WAL
    if damage == "not a database":
        cache.write_bytes(b"this is not an SQLite file\n" * 200)
    else:
        _corrupt(cache)

    with caplog.at_level(logging.WARNING, logger="leccr.core.fingerprint"):
        fingerprints = Fingerprinter(cache)
        digest = fingerprints.path(folder)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(cache) in warnings[0] and "garbled" in warnings[0], warnings
    expected = "(file is not a database)" if damage == "not a database" else "(database disk image is malformed: Page "
    assert expected in warnings[0], warnings[0]
    aside = [p for p in cache.parent.iterdir()
             if p.name.startswith("digests.sqlite.garbled-") and not p.name.endswith(("-wal", "-shm"))]
    assert len(aside) == 1 and aside[0].name in warnings[0]
    assert fingerprints.hashed_bytes == 40 * 4096  # hashed once more ...

    caplog.clear()
    again = Fingerprinter(cache)
    with caplog.at_level(logging.WARNING, logger="leccr.core.fingerprint"):
        assert again.files(fingerprint.files_under(folder)) and again.path(folder) == digest
    assert again.hashed_bytes == 0 and not caplog.records  # ... and remembered by the fresh cache


# ------------------------------------------------------------------------------------------ sampling
def test_a_sampled_description_is_the_same_alone_or_in_any_batch(demo_root, tmp_path):
    """At temperature > 0 each (item, view) samples with its own seed: the transformers engine gives a
    request the same tokens alone and in a left-padded batch of three, as vLLM does (test_vllm_engine)."""
    from dataclasses import replace

    from leccr.engines.mllm import Request, SamplingConfig, TransformersMLLM, request_seed
    from leccr.media.decode import load_image
    from tests.test_media import write_png

    prompts = {"objects": "What objects are there?", "scene": "Where is this photo taken, and what time of day?",
               "short": "Describe."}  # three lengths: the batch is padded
    requests = [Request(f"img{i}", view, prompt, [load_image(write_png(tmp_path / f"{i}.png", 40 + 6 * i, 36,
                                                                       seed=20 + i))],
                        "image", request_seed(42, f"img{i}", view)) for i, (view, prompt) in enumerate(prompts.items())]
    engine = TransformersMLLM(demo_root / "models" / "llava", SamplingConfig(temperature=1.0, max_tokens=10),
                              batch_size=3, dtype="float32")
    together = engine.generate(requests)
    alone = [engine.generate([request])[0] for request in requests]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert [g.text for g in together] == [g.text for g in alone]
    # It does sample: other seeds, other tokens.
    assert len({engine.generate([replace(requests[0], seed=seed)])[0].token_ids for seed in range(3)}) > 1
