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
from leccr.core.dag import plan
from leccr.core.driver import run_pipeline
from tests.conftest import demo_config_dict

REPO = Path(__file__).parents[1]
pytestmark = [
    pytest.mark.slow(seconds=65),
    pytest.mark.skipif(
        shutil.which("ray", path=str(Path(sys.executable).parent)) is None, reason="ray extra not installed"
    ),
]

SHARDED = [s for s in ("translate", "describe", "features") if s in plan().order]


def _small_demo(demo_root: Path, artifacts: Path) -> dict:
    """The demo config on 4 items per split, in shards of 2-8, so each sharded stage has several shards
    and a Ray run stays short on 2 cores."""
    data = demo_config_dict(demo_root, artifacts)
    data["dataset"]["max_items_per_split"] = 4
    data["translate"]["shard_size"] = 8
    data["describe"]["shard_size"] = 2
    data["features"]["shard_size"] = 2
    return data


def _ray_data(demo_root: Path, artifacts: Path) -> dict:
    data = _small_demo(demo_root, artifacts)
    data["runner"] = {"kind": "ray", "num_cpus": 2, "shard_tasks": 2}
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
    from leccr.flows.pipeline import experiment_flow

    local = run_pipeline(parse_config(_small_demo(demo_root, tmp_path / "local")), SHARDED)
    ray_data = _ray_data(demo_root, tmp_path / "ray")
    config = tmp_path / "ray.yaml"
    config.write_text(yaml.safe_dump(ray_data))
    paths = experiment_flow(config=str(config), stages=SHARDED)
    keys = {name: o.artifact.key for name, o in local.items()}
    assert {name: Path(p).name for name, p in paths.items()} == keys  # same keys
    assert _contents(tmp_path / "ray", keys) == _contents(tmp_path / "local", keys)


def test_ray_workers_report_to_the_flows_prefect_api(demo_root, tmp_path):
    """A Ray worker that finds no PREFECT_API_URL starts a temporary Prefect server of its own (seconds
    before its first task, one more server per worker); the flow's runner hands it the flow's API."""
    from prefect import flow, task
    from prefect.client.orchestration import get_client

    from leccr.flows.pipeline import task_runner

    cfg = parse_config({**demo_config_dict(demo_root, tmp_path), "runner": {"kind": "ray", "num_cpus": 1}})

    @task
    def api_url_seen_by_worker() -> str | None:
        return os.environ.get("PREFECT_API_URL")

    @flow(task_runner=task_runner(cfg))
    def probe() -> tuple[str, str | None]:
        with get_client(sync_client=True) as client:
            return str(client.api_url), api_url_seen_by_worker.submit().result()

    driver, worker = probe()
    assert worker == driver


def _kill_marked(marker: str) -> None:
    """SIGKILL every process whose environment holds `marker`: the killed flow's temporary Prefect
    server runs in its own session, so killing the flow's process group leaves it orphaned."""
    needle = f"LECCR_TEST_MARKER={marker}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue  # gone already, or not ours to read


def test_start_on_ray_kill_and_finish_locally(demo_root, tmp_path):
    data = _ray_data(demo_root, tmp_path / "artifacts")
    data["translate"].update(
        shard_size=1,
        engine="transformers",
        lang_code_style="marian",
        max_length=32,
        splits=["train"],
        models={lang: str(demo_root / "models" / "mt") for lang in data["dataset"]["languages"]},
    )
    config = tmp_path / "ray.yaml"
    config.write_text(yaml.safe_dump(data))
    shards = tmp_path / "artifacts" / "translate"
    code = (
        "import sys; from leccr.flows.pipeline import experiment_flow; "
        "experiment_flow(config=sys.argv[1], stages=['translate'])"
    )
    marker = f"leccr-test-{os.getpid()}-{time.time_ns()}"
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(config)],
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "LECCR_TEST_MARKER": marker},
    )
    try:
        deadline = time.time() + 400
        while len(list(shards.glob("*/part-*.parquet"))) < 3:
            assert process.poll() is None, "the Ray run ended before it could be killed"
            assert time.time() < deadline, "no shards committed on Ray in time"
            time.sleep(0.1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True)
        _kill_marked(marker)
    folder = next(shards.glob("*/part-*.parquet")).parent
    finished = {p.name: p.stat().st_mtime_ns for p in folder.glob("part-*.parquet")}
    local_cfg = parse_config({**data, "runner": {"kind": "local"}})
    outcome = run_pipeline(local_cfg, ["translate"])["translate"]
    assert outcome.artifact.path == folder  # the runner is not part of the key
    after = {p.name: p.stat().st_mtime_ns for p in folder.glob("part-*.parquet")}
    assert {n: after[n] for n in finished} == finished  # nothing finished on Ray was recomputed
    assert outcome.artifact.manifest.summary["shards_resumed"] == len(finished)


def _unshare_works() -> bool:
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", "mount -t tmpfs tmpfs /mnt && umount /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.mark.skipif(
    shutil.which("unshare") is None or not _unshare_works(),
    reason="needs unshare + mount (root with CAP_SYS_ADMIN) to give a Ray node its own filesystem view",
)
def test_storage_probe_fails_clearly_when_a_node_cannot_see_the_root(demo_root, tmp_path):
    """A second Ray node runs in its own mount namespace where the artifact root is an empty tmpfs:
    exactly what a worker machine without the shared filesystem sees."""
    import ray

    from leccr.flows.pipeline import experiment_flow
    from leccr.runtime.scaleout import SharedStorageError

    ray_bin = str(Path(sys.executable).parent / "ray")
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    with __import__("socket").socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = f"127.0.0.1:{port}"
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
    subprocess.run(
        [ray_bin, "start", "--head", "--port", str(port), "--include-dashboard", "false", *common],
        check=True,
        capture_output=True,
    )
    other_node = subprocess.Popen(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            f"mount -t tmpfs tmpfs {artifacts} && exec {ray_bin} start --address {address} {' '.join(common)} --block",
        ],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        ray.init(address=address)
        deadline = time.time() + 120
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert time.time() < deadline, "second Ray node did not join"
            time.sleep(0.5)
        ray.shutdown()
        data = _small_demo(demo_root, artifacts)
        data["runner"] = {"kind": "ray", "address": address}
        config = tmp_path / "ray.yaml"
        config.write_text(yaml.safe_dump(data))
        with pytest.raises(
            SharedStorageError,
            match=r"node \w+ .* cannot read the artifact root .*artifacts.*"
            r"filesystem every Ray node mounts",
        ):
            experiment_flow(config=str(config), stages=["dataset"])
        assert not (artifacts / "dataset").exists()  # nothing ran
    finally:
        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True)
        os.killpg(other_node.pid, signal.SIGKILL)
        other_node.wait()
