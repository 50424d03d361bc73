"""The content-addressed store: keys, fingerprints, atomic shards, resume, error threshold, schemas."""

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from leccr.config import ContentPath, Section
from leccr.core.artifact import Artifact, Store
from leccr.core.claims import Claims, host_identity, shard_claim
from leccr.core.context import StageContext
from leccr.core.failures import ItemError, StageFailed
from leccr.core.failures import error_table as _error_table
from leccr.core.fingerprint import Fingerprinter
from leccr.core.keys import KeyParts, resolve_section
from leccr.core.shards import ShardJob, ShardResult, ShardWriter, shard_plan
from leccr.schemas.core import SchemaError, read_table, validate, write_table
from leccr.schemas.errors import ERRORS
from tests.builders import finish_handmade

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
    code = f"from tests.test_store import ToySection, _key; print(_key(ToySection(model={str(model)!r})))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[1],
        env={**os.environ, "PYTHONHASHSEED": "123"},
    )
    assert out.stdout.strip() == _key(ToySection(model=str(model)))


def test_fingerprint_refuses_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        Fingerprinter().path(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        _key(ToySection(model=str(tmp_path / "nope")))


def test_shard_plan():
    assert shard_plan(list(range(5)), 2) == [[0, 1], [2, 3], [4]]
    # shards of whole groups: an item's views stay together
    units = ["a1", "a2", "b1", "c1", "c2", "c3", "d1"]
    assert shard_plan(units, 2, group_of=lambda u: u[0]) == [["a1", "a2", "b1"], ["c1", "c2", "c3", "d1"]]
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
    totals = ctx.run_shards(
        ShardJob(list(range(10)), 4, ROWS, item_id=str, process=process, unit_of=lambda i: f"id{i}")
    )
    assert calls == [0, 1, 2]
    assert (totals.rows, totals.errors, totals.shards_done) == (9, 1, 3)
    assert sorted(p.name for p in ctx.out_dir.glob("part-*.parquet")) == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    errors = pq.read_table(ctx.out_dir / "errors.parquet").to_pylist()
    assert errors == [
        {
            "item_id": "id3",
            "stage": "toy",
            "shard": 0,
            "reason": "bad item",
            "file": None,
            "line": None,
            "retryable": False,
            "file_state": None,
        }
    ]
    # Lose shard 1 (as if killed before its rename): only it is recomputed.
    (ctx.out_dir / "part-00001.parquet").unlink()
    process, calls = _process(fail_ids={3})
    totals = ctx.run_shards(
        ShardJob(list(range(10)), 4, ROWS, item_id=str, process=process, unit_of=lambda i: f"id{i}")
    )
    assert calls == [1]
    assert (totals.rows, totals.errors, totals.shards_resumed) == (9, 1, 2)


def test_background_write_commits_the_same_shards_and_resumes(tmp_path):
    plain, background = _ctx(tmp_path / "plain"), _ctx(tmp_path / "background")
    process, _ = _process(fail_ids={3})
    plain.run_shards(ShardJob(list(range(10)), 4, ROWS, item_id=str, process=process, unit_of=lambda i: f"id{i}"))
    process, calls = _process(fail_ids={3})
    totals = background.run_shards(
        ShardJob(
            list(range(10)), 4, ROWS, item_id=str, process=process, unit_of=lambda i: f"id{i}", background_write=True
        )
    )
    assert calls == [0, 1, 2] and (totals.rows, totals.errors, totals.shards_done) == (9, 1, 3)
    assert not list((background.out_dir / "_claims").glob("*.claim"))  # each released once its shard was committed
    for name in ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet", "errors.parquet"]:
        assert pq.read_table(background.out_dir / name).equals(pq.read_table(plain.out_dir / name)), name
    (background.out_dir / "part-00002.parquet").unlink()
    process, calls = _process(fail_ids={3})
    totals = background.run_shards(
        ShardJob(
            list(range(10)), 4, ROWS, item_id=str, process=process, unit_of=lambda i: f"id{i}", background_write=True
        )
    )
    assert calls == [2] and (totals.rows, totals.shards_resumed) == (9, 2)


def test_background_write_raises_a_failed_commit_and_keeps_the_committed_shards(tmp_path):
    ctx = _ctx(tmp_path)
    calls = []

    def process(items, index):
        calls.append(index)
        values = pa.array(items, pa.int64() if index != 1 else pa.float64())  # shard 1: wrong type
        return ShardResult(pa.table({"item_id": [f"id{i}" for i in items], "value": values}))

    with pytest.raises(SchemaError, match=r"part-00001.parquet: column 'value' has type double"):
        ctx.run_shards(
            ShardJob(
                list(range(10)),
                4,
                ROWS,
                item_id=str,
                process=process,
                unit_of=lambda i: f"id{i}",
                background_write=True,
            )
        )
    # shard 2 may have been computed while shard 1 was written, but the error stops the stage before
    # or at its commit; shard 0 stays committed and shard 1 has no part file
    assert calls[:2] == [0, 1]
    assert (ctx.out_dir / "part-00000.parquet").exists() and not (ctx.out_dir / "part-00001.parquet").exists()


def test_shard_writer_overlaps_the_caller_and_bounds_the_queue():
    writer = ShardWriter(depth=1)
    started, release = threading.Event(), threading.Event()
    order = []
    writer.submit(lambda: (started.set(), release.wait(10), order.append("commit 0")))
    assert started.wait(10)  # the commit runs while the caller goes on
    order.append("caller computes shard 1")
    release.set()
    writer.submit(lambda: order.append("commit 1"))  # returns once commit 0 is done (depth 1)
    assert order[:2] == ["caller computes shard 1", "commit 0"]
    writer.close()
    assert order == ["caller computes shard 1", "commit 0", "commit 1"]


def test_error_rate_threshold_fails_clearly_and_keeps_shards(tmp_path):
    ctx = _ctx(tmp_path)
    process, _ = _process(fail_ids={0, 1, 2})
    with pytest.raises(
        StageFailed,
        match=r"3 of 10 items failed \(30.0% > max_error_rate 10.0%\).*3 finished "
        r"shard\(s\) are kept; 3 are final for this input: a rerun does "
        r"not retry them",
    ):
        ctx.run_shards(
            ShardJob(
                list(range(10)), 4, ROWS, item_id=str, process=process, unit_of=lambda i: f"id{i}", max_error_rate=0.1
            )
        )
    assert len(list(ctx.out_dir.glob("part-*.parquet"))) == 3


def _retrying_process(broken: set[int]):
    """Items in `broken` fail with a retryable error while they are in the set (a file that comes back)."""
    calls = []

    def process(items, index):
        calls.append((index, list(items)))
        good = [i for i in items if i not in broken and i != 9]
        table = pa.table(
            {"item_id": pa.array([f"id{i}" for i in good], pa.string()), "value": pa.array(good, pa.int64())}
        )
        errors = [ItemError(f"id{i}", "file not found", retryable=True) for i in items if i in broken]
        errors += [(f"id{i}", "final") for i in items if i == 9]
        return ShardResult(table, errors)

    return process, calls


def test_rerun_retries_only_retryable_items_and_keeps_the_rest(tmp_path):
    ctx = _ctx(tmp_path)
    broken = {1, 6}
    process, calls = _retrying_process(broken)
    with pytest.raises(
        StageFailed,
        match=r"3 of 10 items failed.*a rerun retries the 2 retryable failure\(s\).*"
        r"the other 1 are final",
    ):
        ctx.run_shards(
            ShardJob(
                list(range(10)),
                4,
                ROWS,
                item_id=lambda i: f"id{i}",
                process=process,
                unit_of=lambda i: f"id{i}",
                max_error_rate=0.1,
            )
        )
    assert [c[0] for c in calls] == [0, 1, 2]
    before = pq.read_table(ctx.out_dir / "part-00002.parquet")
    broken.discard(1)  # one file is back
    process, calls = _retrying_process(broken)
    with pytest.raises(StageFailed, match="2 of 10 items failed"):
        ctx.run_shards(
            ShardJob(
                list(range(10)),
                4,
                ROWS,
                item_id=lambda i: f"id{i}",
                process=process,
                unit_of=lambda i: f"id{i}",
                max_error_rate=0.1,
            )
        )
    assert calls == [(0, [1]), (1, [6])]  # only the retryable items; shard 2's final error is not retried
    shard0 = pq.read_table(ctx.out_dir / "part-00000.parquet").column("item_id").to_pylist()
    assert shard0 == ["id0", "id1", "id2", "id3"]  # in work order, the kept rows untouched
    assert pq.read_table(ctx.out_dir / "part-00002.parquet").equals(before)
    broken.clear()
    process, calls = _retrying_process(broken)
    totals = ctx.run_shards(
        ShardJob(
            list(range(10)),
            4,
            ROWS,
            item_id=lambda i: f"id{i}",
            process=process,
            unit_of=lambda i: f"id{i}",
            max_error_rate=0.1,
        )
    )
    assert calls == [(1, [6])]
    assert (totals.rows, totals.errors, totals.retryable_errors, totals.items_retried) == (9, 1, 0, 1)
    errors = pq.read_table(ctx.out_dir / "errors.parquet").to_pylist()
    assert [(e["item_id"], e["retryable"]) for e in errors] == [("id9", False)]


def test_an_empty_or_cut_committed_shard_is_named_and_recomputed(tmp_path, caplog):
    ctx = _ctx(tmp_path)
    process, _ = _process()
    ctx.run_shards(ShardJob(list(range(10)), 4, ROWS, item_id=str, process=process, unit_of=lambda i: f"id{i}"))
    (ctx.out_dir / "part-00001.parquet").write_bytes(b"")
    data = (ctx.out_dir / "part-00002.parquet").read_bytes()
    (ctx.out_dir / "part-00002.parquet").write_bytes(data[: len(data) // 2])
    process, calls = _process()
    with caplog.at_level(logging.WARNING):
        totals = ctx.run_shards(
            ShardJob(list(range(10)), 4, ROWS, item_id=str, process=process, unit_of=lambda i: f"id{i}")
        )
    assert calls == [1, 2] and totals.shards_recomputed == 2 and totals.rows == 10
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "part-00001.parquet is unusable (the file is empty (0 bytes))" in warned
    assert "part-00002.parquet is unusable" in warned


def test_a_shard_claimed_by_a_live_worker_is_waited_for_and_a_dead_claim_taken_over(tmp_path):
    ctx = _ctx(tmp_path)
    claims = Claims(ctx.out_dir)
    assert claims.acquire(shard_claim(0)) and not Claims(ctx.out_dir).acquire(shard_claim(0))  # this process holds it
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (ctx.out_dir / "_claims" / "part-00001.claim").write_text(
        json.dumps({"host": socket.gethostname(), "host_id": host_identity(), "pid": int(dead.stdout), "started": "1"})
    )
    process, calls = _process()

    def commit_shard0_later():
        time.sleep(1.0)  # the "other worker" finishes shard 0, then releases its claim
        write_table(
            pa.table({"item_id": ["id0", "id1", "id2", "id3"], "value": pa.array([0, 1, 2, 3], pa.int64())}),
            ctx.out_dir / "part-00000.parquet",
            ROWS,
        )
        write_table(_error_table([], "toy", 0), ctx.out_dir / "_errors" / "part-00000.parquet", ERRORS)
        claims.release(shard_claim(0))

    other = threading.Thread(target=commit_shard0_later)
    other.start()
    totals = ctx.run_shards(
        ShardJob(list(range(10)), 4, ROWS, item_id=str, process=process, unit_of=lambda i: f"id{i}")
    )
    other.join()
    assert calls == [1, 2]  # shard 0 was the other worker's; the dead worker's shard 1 was taken over
    assert (totals.shards_done, totals.shards_resumed, totals.rows) == (2, 1, 10)
    assert not list((ctx.out_dir / "_claims").glob("*.claim"))


def test_the_error_rate_is_a_share_of_its_base(tmp_path):
    ctx = _ctx(tmp_path)

    def process(units, index):  # 2 views per item; every item of an odd id fails (one error row per item)
        table = pa.table(
            {
                "item_id": [f"id{i // 2}" for i in units if (i // 2) % 2 == 0],
                "value": pa.array([i for i in units if (i // 2) % 2 == 0], pa.int64()),
            }
        )
        return ShardResult(table, sorted({(f"id{i // 2}", "unreadable") for i in units if (i // 2) % 2}))

    def job(rate):
        return ShardJob(
            list(range(20)),
            2,
            ROWS,
            item_id=lambda i: f"id{i // 2}",
            process=process,
            unit_of=lambda i: f"id{i // 2}\x1f{i % 2}",
            group_of=lambda i: f"id{i // 2}",
            max_error_rate=rate,
            unit="descriptions",
            error_base=10,
            error_unit="items",
        )

    with pytest.raises(StageFailed, match=r"5 of 10 items failed \(50.0%"):
        ctx.run_shards(job(0.3))
    totals = ctx.run_shards(job(0.5))
    assert (totals.rows, totals.errors) == (10, 5)


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


def test_write_table_writes_float_arrays_plain(tmp_path):
    schema = pa.schema(
        [
            pa.field("item_id", pa.string(), nullable=False),
            pa.field("features", pa.list_(pa.float32(), 3), nullable=False),
        ]
    )
    table = pa.table(
        {
            "item_id": ["a", "b"],
            "features": pa.FixedSizeListArray.from_arrays(pa.array([1, 2, 3, 4, 5, 6], pa.float32()), 3),
        }
    )
    write_table(table, tmp_path / "t.parquet", schema)
    group = pq.ParquetFile(tmp_path / "t.parquet").metadata.row_group(0)
    ids, features = group.column(0), group.column(1)
    assert (ids.compression, ids.is_stats_set) == ("SNAPPY", True)
    assert (features.compression, features.is_stats_set, features.has_dictionary_page) == ("UNCOMPRESSED", False, False)
    assert pq.read_table(tmp_path / "t.parquet").column("features").to_pylist() == [[1, 2, 3], [4, 5, 6]]


def test_store_latest_and_discard(tmp_path):
    store = Store(tmp_path)
    artifact = store.artifact("toy", "k1")
    artifact.path.mkdir(parents=True)
    assert store.latest("toy") is None
    (artifact.path / "_manifest.json").write_text("")  # damaged: no artifact to open
    store.mark_latest(artifact)
    assert store.latest("toy") is None
    finish_handmade("toy", artifact.path, "k1")
    assert store.latest("toy") == Artifact("toy", "k1", artifact.path)
    store.discard(artifact)
    assert not artifact.path.exists() and store.latest("toy") is None
