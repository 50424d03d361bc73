"""Scale-out through prefect-ray: identical artifacts to a local run, resume across runners, and the
shared-storage probe. A local Ray (2 CPUs, no dashboard) is started by the flow and stopped with it."""
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from leccr.config import parse_config
from leccr.pipeline import plan, resolve_keys, run_pipeline
from tests.conftest import demo_config_dict

REPO = Path(__file__).parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("ray", path=str(Path(sys.executable).parent)) is None,
                                                    reason="ray extra not installed")]

SHARDED = [s for s in ("translate", "describe", "features") if s in plan().order]


def _ray_data(demo_root: Path, artifacts: Path, shard_size: int = 16) -> dict:
    data = demo_config_dict(demo_root, artifacts)
    data["runner"] = {"kind": "ray", "num_cpus": 2, "shard_tasks": 2}
    data["translate"]["shard_size"] = shard_size
    return data


def _contents(artifacts: Path, keys: dict[str, str]) -> dict[str, str]:
    """Every Parquet file of these artifacts -> hash of its rows (timings columns excluded)."""
    out = {}
    for stage, key in keys.items():
        folder = artifacts / stage / key
        for path in sorted(folder.rglob("*.parquet")):
            table = pq.read_table(path)
            keep = [c for c in table.column_names if c != "seconds"]  # wall-clock time differs run to run
            digest = hashlib.sha256(repr(table.select(keep).to_pylist()).encode()).hexdigest()
            out[f"{stage}/{path.relative_to(folder)}"] = digest
    return out


def test_ray_runner_gives_the_same_artifacts_as_local(demo_root, tmp_path):
    from flows.leccr import leccr

    local_cfg = parse_config(demo_config_dict(demo_root, tmp_path / "local"))
    local = run_pipeline(local_cfg, SHARDED)
    ray_data = _ray_data(demo_root, tmp_path / "ray", shard_size=local_cfg.translate.shard_size)
    config = tmp_path / "ray.yaml"
    config.write_text(yaml.safe_dump(ray_data))
    paths = leccr(config=str(config), stages=SHARDED)
    keys = {name: o.artifact.key for name, o in local.items()}
    assert {name: Path(p).name for name, p in paths.items()} == keys  # same keys
    assert _contents(tmp_path / "ray", keys) == _contents(tmp_path / "local", keys)


def test_start_on_ray_kill_and_finish_locally(demo_root, tmp_path):
    data = _ray_data(demo_root, tmp_path / "artifacts", shard_size=2)
    data["translate"].update(engine="transformers", lang_code_style="marian", max_length=96, splits=["train"],
                             models={lang: str(demo_root / "models" / "mt") for lang in data["dataset"]["languages"]})
    config = tmp_path / "ray.yaml"
    config.write_text(yaml.safe_dump(data))
    cfg = parse_config(data)
    folder = tmp_path / "artifacts" / "translate" / resolve_keys(cfg, ["translate"])["translate"]
    code = "import sys; from flows.leccr import leccr; leccr(config=sys.argv[1], stages=['translate'])"
    process = subprocess.Popen([sys.executable, "-c", code, str(config)], cwd=REPO, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 400
        while len(list(folder.glob("part-*.parquet"))) < 3:
            assert process.poll() is None, "the Ray run ended before it could be killed"
            assert time.time() < deadline, "no shards committed on Ray in time"
            time.sleep(0.1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True)
    finished = {p.name: p.stat().st_mtime_ns for p in folder.glob("part-*.parquet")}
    local_cfg = parse_config({**data, "runner": {"kind": "local"}})
    outcome = run_pipeline(local_cfg, ["translate"])["translate"]
    assert outcome.artifact.path == folder  # the runner is not part of the key
    after = {p.name: p.stat().st_mtime_ns for p in folder.glob("part-*.parquet")}
    assert {n: after[n] for n in finished} == finished  # nothing finished on Ray was recomputed
    assert outcome.artifact.manifest["summary"]["shards_resumed"] == len(finished)
