"""The DAG through the store: cache hits, what reruns after a config change, kill and resume."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from leccr.config import parse_config
from leccr.core.dag import plan
from leccr.core.driver import run_pipeline
from leccr.core.explain import explain
from leccr.records.sql import connect
from tests.conftest import demo_config_dict

REPO = Path(__file__).parents[1]


def _cfg(demo_root, artifacts, **sections):
    data = demo_config_dict(demo_root, artifacts)
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return parse_config(data)


def test_plan_adds_upstream_and_forces_downstream():
    the_plan = plan(["translate"])
    assert the_plan.order == ("dataset", "translate")
    forced = plan(None, force=["translate"]).forced
    assert "translate" in forced and "dataset" not in forced and "describe" not in forced
    if "features" in plan().order:
        assert "features" in forced
    with pytest.raises(ValueError, match="unknown stage 'translat'"):
        plan(["translat"])


def test_changing_translate_config_reruns_it_and_downstream_only(demo_root, tmp_path):
    stages = ["translate", "describe", "features"]
    run_pipeline(_cfg(demo_root, tmp_path), stages)
    planned = {p.name: p for p in explain(_cfg(demo_root, tmp_path, translate={"splits": ["train"]}), stages)}
    assert {name for name, p in planned.items() if p.status != "hit"} == {"translate", "features"}
    # fewer splits: nothing to translate, every unit reused (splits only choose the units)
    assert planned["translate"].reasons[0] == 'translate.splits: ["train", "val"] → ["train"]'
    assert planned["translate"].reasons[1].startswith("0 of ") and planned["translate"].reasons[1].endswith(" reused")
    assert planned["features"].status == "pending" and planned["features"].reasons == ["after translate"]
    # A field that does not change output keeps every key.
    assert all(p.status == "hit" for p in explain(_cfg(demo_root, tmp_path, translate={"batch_size": 3}), stages))


def test_second_run_is_all_cache_hits_and_translate_change_reruns_downstream(demo_root, tmp_path):
    stages = [s for s in ("translate", "describe", "features") if s in plan().order]
    cfg = _cfg(demo_root, tmp_path)
    first = run_pipeline(cfg, stages)
    assert not any(o.cache_hit for o in first.values())
    second = run_pipeline(cfg, stages)
    assert all(o.cache_hit for o in second.values())
    changed = run_pipeline(_cfg(demo_root, tmp_path, translate={"splits": ["train"]}), stages)
    reran = {name for name, o in changed.items() if not o.cache_hit}
    assert reran == {"translate", "features"} & set(stages)
    # The latest run's translate output is visible in DuckDB.
    rows = connect(tmp_path).execute("SELECT count(*), count(DISTINCT lang) FROM translate").fetchone()
    assert rows == (changed["translate"].artifact.manifest.summary["translations"], 3)


def test_force_recomputes_the_stage(demo_root, tmp_path):
    cfg = _cfg(demo_root, tmp_path)
    run_pipeline(cfg, ["translate"])
    again = run_pipeline(cfg, ["translate"], force=["translate"])
    assert again["dataset"].cache_hit and not again["translate"].cache_hit


@pytest.mark.slow(seconds=25)
def test_killed_run_resumes_without_losing_finished_shards(demo_root, tmp_path):
    """A real subprocess is SIGKILLed mid-translate; the rerun recomputes only the missing shards."""
    data = demo_config_dict(demo_root, tmp_path / "artifacts")
    data["dataset"]["max_items_per_split"] = 3  # 15 English captions: 8 shards of 2
    data["translate"] = {
        "engine": "transformers",
        "lang_code_style": "marian",
        "shard_size": 2,
        "max_length": 32,
        "splits": ["train"],
        "models": {lang: str(demo_root / "models" / "mt") for lang in data["dataset"]["languages"]},
    }
    config = tmp_path / "kill.yaml"
    config.write_text(yaml.safe_dump(data))
    code = (
        "import sys; from leccr.config import load_config; from leccr.core.driver import run_pipeline; "
        "run_pipeline(load_config(sys.argv[1]), ['translate'])"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(config)],
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    cfg = parse_config(data)
    deadline = time.time() + 300
    while len(list((tmp_path / "artifacts" / "translate").glob("*/part-*.parquet"))) < 2:
        assert process.poll() is None, "the run finished before it could be killed: make shards slower"
        assert time.time() < deadline, "no shard committed in 300 s"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    folder = next((tmp_path / "artifacts" / "translate").glob("*/part-*.parquet")).parent
    assert not (folder / "_manifest.json").exists()
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("part-*.parquet")}
    outcome = run_pipeline(cfg, ["translate"])["translate"]
    assert not outcome.cache_hit
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("part-*.parquet")}
    assert {name: after[name] for name in finished} == finished  # finished shards untouched
    summary = outcome.artifact.manifest.summary
    assert summary["shards_resumed"] == len(finished)
    assert len(after) == -(-summary["english_captions"] // 2) > len(finished)  # every shard, once
