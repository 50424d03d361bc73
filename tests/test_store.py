"""The content-addressed store: keys, fingerprints, atomic shards, resume, error threshold, schemas."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from leccr.config import ContentPath, Section
from leccr.fingerprint import Fingerprinter
from leccr.store import (Artifact, KeyParts, ShardResult, StageContext, StageFailed, Store, resolve_section,
                         shard_plan)
from schemas.core import SchemaError, read_table, validate, write_table

ROWS = pa.schema([pa.field("item_id", pa.string(), nullable=False), pa.field("value", pa.int64())])


class ToySection(Section):
    NON_OUTPUT_FIELDS = frozenset({"batch_size"})
    model: ContentPath
    width: int = 4
    batch_size: int = 8
    engine: str = "a"
    engine_b_option: int = 0

    def unused_fields(self) -> frozenset[str]:
        return frozenset() if self.engine == "b" else frozenset({"engine_b_option"})


def _model_dir(tmp_path: Path, weights: bytes = b"weights") -> Path:
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text('{"hidden": 4}')
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def _key(section, upstream=None, code="c1"):
    config = resolve_section(section, Fingerprinter())
    return KeyParts("toy", code, config, upstream or {"dataset": "abc"}).key


def test_key_ignores_non_output_fields_and_path_spelling(tmp_path):
    model = _model_dir(tmp_path)
    base = _key(ToySection(model=str(model)))
    assert base == _key(ToySection(model=str(model), batch_size=64))  # batch size does not change output
    moved = tmp_path / "elsewhere"
    os.rename(model, moved)  # a moved checkout: same content, same key
    assert _key(ToySection(model=str(moved))) == base


def test_key_covers_only_fields_the_section_uses(tmp_path):
    model = str(_model_dir(tmp_path))
    base = _key(ToySection(model=model))
    assert _key(ToySection(model=model, engine_b_option=3)) == base  # engine a never reads it
    b = _key(ToySection(model=model, engine="b"))
    assert b != base and _key(ToySection(model=model, engine="b", engine_b_option=3)) != b


def test_key_changes_with_what_produced_the_output(tmp_path):
    model = _model_dir(tmp_path)
    base = _key(ToySection(model=str(model)))
    assert _key(ToySection(model=str(model), width=5)) != base
    assert _key(ToySection(model=str(model)), code="c2") != base
    assert _key(ToySection(model=str(model)), upstream={"dataset": "abd"}) != base
    _model_dir(tmp_path, weights=b"other weights")
    assert _key(ToySection(model=str(model))) != base


def test_key_is_stable_across_processes(tmp_path):
    model = _model_dir(tmp_path)
    code = (
        "from tests.test_store import ToySection, _key; "
        f"print(_key(ToySection(model={str(model)!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1], env={**os.environ, "PYTHONHASHSEED": "123"})
    assert out.stdout.strip() == _key(ToySection(model=str(model)))


def test_fingerprint_refuses_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        Fingerprinter().path(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        _key(ToySection(model=str(tmp_path / "nope")))


def test_shard_plan():
    assert shard_plan(list(range(5)), 2) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError):
        shard_plan([1], 0)


def _ctx(tmp_path: Path) -> StageContext:
    out = tmp_path / "toy" / "k"
    out.mkdir(parents=True)
    return StageContext("toy", "k", ToySection(model=str(tmp_path)), {}, out, logging.getLogger("toy"))


def _process(fail_ids=()):
    calls = []

    def process(items, index):
        calls.append(index)
        good = [i for i in items if i not in fail_ids]
        table = pa.table({"item_id": [f"id{i}" for i in good], "value": pa.array(good, pa.int64())})
        return ShardResult(table, [(f"id{i}", "bad item") for i in items if i in fail_ids])

    return process, calls


def test_run_shards_resumes_and_collects_errors(tmp_path):
    ctx = _ctx(tmp_path)
    process, calls = _process(fail_ids={3})
    totals = ctx.run_shards(list(range(10)), 4, process, ROWS, item_id=str)
    assert calls == [0, 1, 2]
    assert (totals.rows, totals.errors, totals.shards_done) == (9, 1, 3)
    assert sorted(p.name for p in ctx.out_dir.glob("part-*.parquet")) == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    errors = pq.read_table(ctx.out_dir / "errors.parquet").to_pylist()
    assert errors == [{"item_id": "id3", "stage": "toy", "shard": 0, "reason": "bad item"}]
    # Lose shard 1 (as if killed before its rename): only it is recomputed.
    (ctx.out_dir / "part-00001.parquet").unlink()
    process, calls = _process(fail_ids={3})
    totals = ctx.run_shards(list(range(10)), 4, process, ROWS, item_id=str)
    assert calls == [1]
    assert (totals.rows, totals.errors, totals.shards_resumed) == (9, 1, 2)


def test_error_rate_threshold_fails_clearly_and_keeps_shards(tmp_path):
    ctx = _ctx(tmp_path)
    process, _ = _process(fail_ids={0, 1, 2})
    with pytest.raises(StageFailed, match=r"3 of 10 items failed \(30.0% > max_error_rate 10.0%\).*rerun resumes"):
        ctx.run_shards(list(range(10)), 4, process, ROWS, item_id=str, max_error_rate=0.1)
    assert len(list(ctx.out_dir.glob("part-*.parquet"))) == 3


def test_schema_rejects_malformed_tables_with_the_file_name(tmp_path):
    bad = pa.table({"item_id": ["a"], "value": pa.array([1.5], pa.float64())})
    with pytest.raises(SchemaError, match=r"shard-7: column 'value' has type double, expected int64"):
        validate(bad, ROWS, "shard-7")
    with pytest.raises(SchemaError, match=r"missing column\(s\) \['value'\]"):
        validate(pa.table({"item_id": ["a"]}), ROWS, "x")
    with pytest.raises(SchemaError, match="'item_id' has 1 null"):
        validate(pa.table({"item_id": pa.array([None], pa.string()), "value": pa.array([1], pa.int64())}), ROWS, "x")
    # A malformed shard on disk is rejected on read, naming the file.
    path = tmp_path / "part-00000.parquet"
    pq.write_table(bad, path)
    with pytest.raises(SchemaError, match="part-00000.parquet"):
        read_table([path], ROWS)


def test_write_table_is_atomic_and_round_trips(tmp_path):
    table = pa.table({"item_id": ["a", "b"], "value": pa.array([1, 2], pa.int64())})
    path = write_table(table, tmp_path / "t.parquet", ROWS)
    assert read_table(path, ROWS).to_pylist() == table.to_pylist()
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]  # no temp file left behind


def test_store_latest_and_discard(tmp_path):
    store = Store(tmp_path)
    artifact = store.artifact("toy", "k1")
    artifact.path.mkdir(parents=True)
    assert store.latest("toy") is None
    (artifact.path / "_manifest.json").write_text(json.dumps({"rows": {}}))
    store.mark_latest(artifact)
    assert store.latest("toy") == Artifact("toy", "k1", artifact.path)
    store.discard(artifact)
    assert not artifact.path.exists() and store.latest("toy") is None
