"""Fault injection on a copy of the demo data: each kind of bad input costs its item, never the run.

Each test damages a fresh copy of the session's demo folder (tests/conftest.py `demo_root`) the way a
user's disk or editor would, runs the real stages (in-process through `run_pipeline`; a subprocess
where a kill or a second concurrent run is the point) and checks: the run completes (or stops with
one clear line where it must), the bad item is named, nothing finished is lost, a fixed input is
picked up. docs/caching.md lists the cases under "What happens to bad input".
"""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from leccr.cli import main
from leccr.config import parse_config
from leccr.core.driver import run_pipeline
from leccr.core.explain import explain
from leccr.core.failures import StageFailed
from leccr.datasets.check import check_command
from tests.conftest import demo_config_dict

REPO = Path(__file__).parents[2]
ONE_VIEW = {"detailed": "Describe this."}  # one short view keeps the tiny LLaVA's work small


def _copy(demo_root: Path, dest: Path) -> Path:
    return Path(shutil.copytree(demo_root / "data", dest))


def _config(demo_root: Path, data: Path, artifacts: Path, **sections) -> dict:
    config = demo_config_dict(demo_root, artifacts)
    config["dataset"]["path"] = str(data)
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


def _describe(**extra) -> dict:
    return {
        "splits": ["test"],
        "image_views": ONE_VIEW,
        "video_views": ONE_VIEW,
        "max_tokens": 6,
        "max_error_rate": 0.5,
        **extra,
    }


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")


def _test_items(data: Path) -> list[str]:
    return (data / "data/task1/image_splits/test_2016_flickr.txt").read_text().split()


def _rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


# ------------------------------------------------------------------------------------------ dataset
def test_bad_lines_and_missing_files_become_error_rows_and_the_rest_is_read(demo_root, tmp_path):
    data = _copy(demo_root, tmp_path / "data")
    task1, task2 = data / "data/task1", data / "data/task2"
    train_list = task1 / "image_splits/train.txt"
    names = train_list.read_text().split()
    # An image missing from the split list (its task-1 caption line removed with it, as a curator would).
    unlisted = names[1].split(".")[0]
    train_list.write_text("".join(f"{n}\n" for n in names[:1] + names[2:]))
    en = _lines(task1 / "raw/train.en")
    (task1 / "raw/train.en").write_bytes(b"\xef\xbb\xbf" + b"\n".join(en[:1] + en[2:]))  # and a UTF-8 BOM
    (task1 / "raw/val.en").write_bytes((task1 / "raw/val.en").read_bytes() + b"\n\n \n")  # trailing blank lines
    mt = data / "TextData/Flickr30ktrain_google_enc2de.caption.txt"
    lines = _lines(mt)
    bad_caption = lines[4].split()[0].decode()
    lines[4] += b" \xff"  # not UTF-8
    mt.write_bytes(b"\n".join(lines))
    t2 = task2 / "raw/train.2.en"
    lines = _lines(t2)
    lines[2] = b""  # an empty caption line
    t2.write_bytes(b"\n".join(lines))
    empty_item = (task2 / "image_splits/train_images.txt").read_text().split()[2].split(".")[0]
    missing = _test_items(data)[0]
    (data / "images" / missing).unlink()  # a missing media file

    cfg = parse_config(_config(demo_root, data, tmp_path / "artifacts"))
    outcome = run_pipeline(cfg, ["dataset"])["dataset"]
    folder = outcome.artifact.path
    errors = _rows(folder / "errors.parquet")
    where = {(e["file"], e["line"], e["item_id"]) for e in errors}
    assert ("TextData/Flickr30ktrain_google_enc2de.caption.txt", 5, bad_caption) in where
    assert any(e["reason"].startswith("not valid UTF-8: byte 0xff") for e in errors)
    assert ("data/task2/raw/train.2.en", 3, empty_item) in where
    assert ("data/task1/image_splits/test_2016_flickr.txt", 1, missing.split(".")[0]) in where
    assert any(e["item_id"] == unlisted and "not in the task-1 list" in e["reason"] for e in errors)
    assert not any(e["retryable"] for e in errors) and {e["stage"] for e in errors} == {"dataset"}
    assert outcome.errors == len(errors)
    items = _rows(folder / "items.parquet")
    assert len(items) == 84 - 2 and {missing.split(".")[0], unlisted}.isdisjoint(i["item_id"] for i in items)
    captions = _rows(folder / "captions.parquet")
    assert not any(c["text"].startswith("\ufeff") for c in captions)  # the BOM is gone ...
    assert not any(c["caption_id"].endswith("#t1") for c in captions)  # ... so no duplicate English caption
    assert check_command(data, "multi30k") == 1  # `leccr datasets check` stays strict

    # Past dataset.max_error_rate: one message naming the problems and the threshold.
    strict = parse_config(_config(demo_root, data, tmp_path / "strict", dataset={"max_error_rate": 0.001}))
    with pytest.raises(StageFailed, match=r"dataset rows \(items and captions\) are bad .* > dataset.max_error_rate"):
        run_pipeline(strict, ["dataset"])

    # The file is back: a new key (the folder's content changed), and the item is read.
    shutil.copyfile(demo_root / "data/images" / missing, data / "images" / missing)
    fixed = run_pipeline(cfg, ["dataset"])["dataset"]
    assert fixed.artifact.key != outcome.artifact.key
    assert missing.split(".")[0] in {i["item_id"] for i in _rows(fixed.artifact.path / "items.parquet")}


# ------------------------------------------------------------------------------------------ media
def test_broken_media_cost_their_items_a_fixed_file_is_described_and_a_moved_folder_keeps_every_hit(
    demo_root, tmp_path, caplog
):
    data = _copy(demo_root, tmp_path / "data")
    test_items = _test_items(data)
    image = next(n for n in test_items if n.endswith(".png"))
    empty, garbage, cut = [n for n in test_items if n.endswith(".mp4")][:3]
    original = (data / "images" / image).read_bytes()
    broken = bytearray(original)
    broken[len(broken) // 2 : len(broken) // 2 + 64] = bytes(64)  # same size: the dataset key stays
    (data / "images" / image).write_bytes(bytes(broken))
    (data / "images" / empty).write_bytes(b"")
    (data / "images" / garbage).write_bytes(os.urandom(4096))
    video = (data / "images" / cut).read_bytes()
    (data / "images" / cut).write_bytes(video[: len(video) // 2])
    artifacts = tmp_path / "artifacts"
    cfg = parse_config(_config(demo_root, data, artifacts, describe=_describe(shard_size=6)))

    first = run_pipeline(cfg, ["describe"])["describe"]
    folder = first.artifact.path
    errors = {e["item_id"]: e for e in _rows(folder / "errors.parquet")}
    assert set(errors) == {n.split(".")[0] for n in (image, empty, garbage, cut)}
    assert all(e["retryable"] for e in errors.values())
    assert "file is empty (0 bytes)" in errors[empty.split(".")[0]]["reason"]
    assert all(
        str(data / "images" / name) in errors[name.split(".")[0]]["reason"] for name in (image, empty, garbage, cut)
    )  # the bad file is named
    described = {r["item_id"]: r["description"] for p in sorted(folder.glob("part-*.parquet")) for r in _rows(p)}
    assert len(described) == len(test_items) - 4
    assert first.rows["part-00000.parquet"] + first.rows["part-00001.parquet"] + first.rows[
        "part-00002.parquet"
    ] == len(described)  # rows= counts descriptions, not error rows

    # The folder moved: same content, so every stage is a cache hit under the new dataset.path.
    moved = Path(shutil.move(str(data), tmp_path / "moved"))
    cfg_moved = parse_config(_config(demo_root, moved, artifacts, describe=_describe(shard_size=6)))
    assert all(o.cache_hit for o in run_pipeline(cfg_moved, ["describe"]).values())
    # The image is fixed: the dataset is read again (its folder changed). Its rows are the same, but
    # the media under them are not, so describe is keyed anew (a file edited in place must never be
    # served from the old output) and describes the fixed item; the videos are as broken as they were
    # and every other description comes out as it was.
    (moved / "images" / image).write_bytes(original)
    second = run_pipeline(cfg_moved, ["describe"])
    assert second["describe"].artifact.key != first.artifact.key and not second["describe"].cache_hit
    folder = second["describe"].artifact.path
    errors = {e["item_id"] for e in _rows(folder / "errors.parquet")}
    assert errors == {n.split(".")[0] for n in (empty, garbage, cut)}  # the three videos are still broken
    after = {r["item_id"]: r["description"] for p in sorted(folder.glob("part-*.parquet")) for r in _rows(p)}
    assert {k: after[k] for k in described} == described and image.split(".")[0] in after
    # Nothing changed since: a finished stage with still-broken files is a cache hit, not a retry loop.
    assert run_pipeline(cfg_moved, ["describe"])["describe"].cache_hit

    # A committed shard cut to 0 bytes (a crash before the data hit the disk): named, recomputed.
    (folder / "_manifest.json").unlink()
    (folder / "part-00001.parquet").write_bytes(b"")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        third = run_pipeline(cfg_moved, ["describe"])["describe"]
    assert any("part-00001.parquet is unusable (the file is empty (0 bytes))" in r.getMessage() for r in caplog.records)
    again = {r["item_id"]: r["description"] for p in sorted(folder.glob("part-*.parquet")) for r in _rows(p)}
    assert again == after and third.errors == 3


# ------------------------------------------------------------------------------------------ processes
def _describe_process(config: Path, log: Path) -> subprocess.Popen:
    code = (
        "import logging, sys; from leccr.config import load_config; from leccr.core.driver import run_pipeline; "
        "logging.basicConfig(level=logging.WARNING, format='%(message)s'); "
        "logging.getLogger('leccr.stages.describe').setLevel(logging.DEBUG); "
        "run_pipeline(load_config(sys.argv[1]), ['describe'])"
    )
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-c", code, str(config)],
            cwd=REPO,
            start_new_session=True,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )


def _committed(log: Path) -> list[int]:
    return [
        int(line.split("shard ")[1].split()[0])
        for line in log.read_text().splitlines()
        if "describe: shard " in line and " committed" in line
    ]


@pytest.mark.slow(seconds=30)
def test_kill_9_mid_stage_then_two_concurrent_runs_compute_each_shard_once(demo_root, tmp_path):
    data = _copy(demo_root, tmp_path / "data")
    config_data = _config(demo_root, data, tmp_path / "artifacts", describe=_describe(shard_size=2))
    config = tmp_path / "describe.yaml"
    config.write_text(json.dumps(config_data))
    cfg = parse_config(config_data)
    run_pipeline(cfg, ["dataset"])
    key = {stage.name: stage.key for stage in explain(cfg, ["describe"])}["describe"]
    folder = tmp_path / "artifacts" / "describe" / key
    shards = -(-len(_test_items(data)) // 2)

    killed = _describe_process(config, tmp_path / "killed.log")
    deadline = time.time() + 300
    while len(list(folder.glob("part-*.parquet"))) < 2:
        assert killed.poll() is None, (tmp_path / "killed.log").read_text()[-2000:]
        assert time.time() < deadline, "no shard committed in 300 s"
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("part-*.parquet")}
    assert 2 <= len(finished) < shards and not (folder / "_manifest.json").exists()

    # Two runs at once on the same root: the dead worker's claim is taken over, every remaining shard
    # is computed by exactly one of them, and the finished shards are kept untouched.
    runs = [_describe_process(config, tmp_path / f"run{i}.log") for i in range(2)]
    for run in runs:
        assert run.wait(timeout=600) == 0, (tmp_path / f"run{runs.index(run)}.log").read_text()[-2000:]
    computed = [_committed(tmp_path / f"run{i}.log") for i in range(2)]
    assert sorted(computed[0] + computed[1]) == sorted(set(range(shards)) - {int(n[5:10]) for n in finished})
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("part-*.parquet")}
    assert {name: after[name] for name in finished} == finished and len(after) == shards
    assert (folder / "_manifest.json").is_file() and not list((folder / "_claims").glob("*.claim"))


# ------------------------------------------------------------------------------------------ environment
def test_unusable_artifacts_root_or_dataset_path_is_one_line_before_prefect_starts(
    demo_root, tmp_path, capsys, monkeypatch
):
    def run(**changes) -> str:
        config_data = _config(demo_root, demo_root / "data", tmp_path / "artifacts")
        for key, value in changes.items():
            section, _, field = key.partition("__")
            if field:
                config_data[section][field] = value
            else:
                config_data[section] = value
        path = tmp_path / "config.yaml"
        path.write_text(json.dumps(config_data))
        started = time.perf_counter()
        assert main(["run", "--config", str(path)]) == 2
        assert time.perf_counter() - started < 5  # no Prefect server was started
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("leccr: error: ") and "Traceback" not in err
        return err

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert f"artifacts root {a_file} is a file, not a folder" in run(artifacts_root=str(a_file))
    assert "the artifacts root /sys is not writable: Permission denied" in run(artifacts_root="/sys")
    assert "cannot create the artifacts root /sys/leccr" in run(artifacts_root="/sys/leccr/artifacts")
    assert f"dataset.path {a_file} is a file, not a folder" in run(dataset__path=str(a_file))
    assert "dataset.path" in run(dataset__path=str(tmp_path / "nowhere")) and "does not exist" in run(
        dataset__path=str(tmp_path / "nowhere")
    )

    import errno

    import leccr.runtime.preflight

    def full_disk(path):  # what os.write raises on a full disk (no full filesystem to be had in a test)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(leccr.runtime.preflight, "_write_probe", full_disk)
    assert f"the disk of the artifacts root {tmp_path / 'artifacts'} is full" in run()


# ------------------------------------------------------------------------------------------ inspect
@pytest.fixture
def inspected(tmp_path):
    """An artifacts root with a dataset artifact whose caption text is longer than any terminal."""
    from leccr.core.artifact import Store
    from tests.builders import dataset_artifact

    root = tmp_path / "artifacts"
    long_text = " ".join(["a very long caption"] * 12)
    artifact = dataset_artifact(
        root / "dataset" / "k",
        [{"item_id": "i0", "split": "test"}],
        [{"item_id": "i0", "caption_id": "c0", "split": "test", "lang": "en", "text": long_text}],
        ["de"],
        key="k",
    )
    Store(root).mark_latest(artifact)
    return root, long_text


def test_inspect_reads_the_artifacts_and_nothing_else(inspected, tmp_path, capsys):
    root, long_text = inspected
    secret = tmp_path / "outside.csv"
    secret.write_text("a\n1\n")
    refused = {
        f"COPY (SELECT * FROM captions) TO '{root}/dataset/k/copy.csv'": "refused COPY statement",
        f"SELECT * FROM read_csv('{secret}')": "file system operations are disabled",
        f"SELECT * FROM read_csv('{root}/../outside.csv')": "file system operations are disabled",
        "SELECT 1; CREATE TABLE t AS SELECT 1": "refused CREATE statement",
        "SET enable_external_access = true": "refused SET statement",
        f"ATTACH '{root}/x.duckdb'": "refused ATTACH statement",
        "INSTALL httpfs": "refused INSTALL statement",  # a LOAD statement to DuckDB: named as written
        "LOAD httpfs": "refused LOAD statement",
        "SELEC 1": "syntax error",
    }
    for sql, message in refused.items():
        assert main(["inspect", "--root", str(root), sql]) == 1, sql
        err = capsys.readouterr().err
        assert err.startswith("leccr: error: ") and message in err, (sql, err)
    assert sorted(p.name for p in (root / "dataset" / "k").iterdir()) == [
        "_manifest.json",
        "captions.parquet",
        "items.parquet",
    ]  # nothing was written

    # Every format prints whole values (no 80-column cut when not on a terminal).
    assert main(["inspect", "--root", str(root), "SELECT caption_id, text FROM captions"]) == 0
    assert long_text in capsys.readouterr().out
    assert main(["inspect", "--root", str(root), "--format", "csv", "SELECT caption_id, text FROM captions"]) == 0
    assert capsys.readouterr().out == f"caption_id,text\nc0,{long_text}\n"
    assert main(["inspect", "--root", str(root), "--format", "json", "SELECT caption_id, lang FROM captions"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"caption_id": "c0", "lang": "en"}]
    assert main(["inspect", "--root", str(root), "--format", "markdown", "SELECT caption_id, lang FROM captions"]) == 0
    assert capsys.readouterr().out == "| caption_id | lang |\n|---|---|\n| c0 | en |\n"
    assert main(["inspect", "--root", str(root), "--print-sql"]) == 0
    printed = capsys.readouterr().out
    assert 'CREATE OR REPLACE VIEW "captions"' in printed and "SET enable_external_access = false" in printed


# ------------------------------------------------------------------------------------------ trust
def test_a_damaged_finished_shard_is_named_and_only_it_is_recomputed(demo_root, tmp_path, caplog):
    data = _copy(demo_root, tmp_path / "data")
    cfg = parse_config(_config(demo_root, data, tmp_path / "artifacts", describe=_describe(shard_size=2)))
    first = run_pipeline(cfg, ["describe"])["describe"]
    folder = first.artifact.path
    size = (folder / "part-00001.parquet").stat().st_size
    kept = {p.name: p.stat().st_ino for p in folder.glob("part-*.parquet") if p.name != "part-00001.parquet"}
    (folder / "part-00001.parquet").write_bytes(b"")  # a finished artifact's shard truncated to 0 bytes

    planned = {p.name: p for p in explain(cfg, ["describe"])}["describe"]
    assert planned.status == "miss" and planned.reasons[0] == f"part-00001.parquet is 0 bytes, manifest says {size:,}"
    with caplog.at_level(logging.WARNING):
        again = run_pipeline(cfg, ["describe"])["describe"]
    assert any(
        f"describe: part-00001.parquet is 0 bytes, manifest says {size:,}" in r.getMessage() for r in caplog.records
    )
    assert again.artifact.key == first.artifact.key and not again.cache_hit
    assert again.artifact.manifest.summary["reuse"]["rows"]["computed"] == 2  # the damaged shard's two items
    assert {p.name: p.stat().st_ino for p in folder.glob("part-*.parquet") if p.name in kept} == kept
    assert again.artifact.content_digest == first.artifact.content_digest
    assert run_pipeline(cfg, ["describe"])["describe"].cache_hit


def _run_process(config: Path, stages: list[str], log: Path) -> subprocess.Popen:
    code = (
        "import logging, sys; from leccr.config import load_config; from leccr.core.driver import run_pipeline; "
        "logging.basicConfig(level=logging.INFO, format='%(name)s %(message)s'); "
        "run_pipeline(load_config(sys.argv[1]), sys.argv[2:])"
    )
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-c", code, str(config), *stages],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )


@pytest.mark.slow(seconds=25)
def test_two_concurrent_runs_make_every_artifact_once(demo_root, tmp_path):
    """Whole-artifact stages (train, evaluate, index, dataset) are claimed like shards: the second run
    waits for the first and serves its result, so each artifact is computed once and both runs agree."""
    data = _copy(demo_root, tmp_path / "data")
    config_data = _config(
        demo_root,
        data,
        tmp_path / "artifacts",
        describe=_describe(splits=None),
        dataset={"max_items_per_split": 6},
        train={"methods": ["baseline"], "epochs": 1, "early_stopping_patience": None},
    )
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(config_data))
    runs = [_run_process(config, ["evaluate"], tmp_path / f"run{i}.log") for i in range(2)]
    logs = []
    for i, run in enumerate(runs):
        assert run.wait(timeout=900) == 0, (tmp_path / f"run{i}.log").read_text()[-3000:]
        logs.append((tmp_path / f"run{i}.log").read_text())
    for label in ("dataset", "translate", "describe", "visual", "features", "train[baseline]", "evaluate"):
        computed = sum(log.count(f" {label}: computing ") for log in logs)
        assert computed == 1, (label, computed)
    keys = {stage.name: stage.key for stage in explain(parse_config(config_data), ["evaluate"])}
    assert all(stage.status == "hit" for stage in explain(parse_config(config_data), ["evaluate"]))
    assert len(list((tmp_path / "artifacts" / "evaluate").glob("*/_manifest.json"))) == 1
    assert json.loads((tmp_path / "artifacts" / "runs" / "demo.json").read_text()) == keys
