"""Every file a run depends on is keyed by content, and the digest cache that makes that cheap stays
cheap and sound: media outside the dataset folder, hard links made by the features stage, a garbled
cache file. Each case served stale output, reread every file or hashed silently forever before.
"""
import logging
import os
import sqlite3
from pathlib import Path

import pytest

import leccr.core.fingerprint as fingerprint
from leccr.config import parse_config
from leccr.core.artifact import damaged_files
from leccr.core.fingerprint import Fingerprinter, fingerprinter_for
from leccr.core.runner import run_pipeline
from tests.faults.test_same_bytes import _small


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
    """Overwrite pages in the middle of an SQLite file, as a crash of a disk or a bad copy would."""
    data = bytearray(cache.read_bytes())
    page = 4096
    data[page * 2: page * 4] = os.urandom(page * 2)
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
