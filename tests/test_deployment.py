"""The README's deployment sequence, for real: a Prefect server on 127.0.0.1, a process work pool,
`prefect deploy`, a worker, and `prefect deployment run leccr/full --watch` on the demo config.
Everything started here is stopped here, by its own process id."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"prefect server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"prefect server at {url} not healthy after {timeout}s")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_prefect_deployment_run_leccr_full(demo_config, tmp_path):
    config_path, artifacts = demo_config
    # Every stage, on 6 items per split and 2 epochs: the deployment path, not the demo's numbers.
    data = yaml.safe_load(config_path.read_text())
    data["dataset"]["max_items_per_split"] = 6
    data["train"].update(epochs=2, batch_size=16)
    config_path.write_text(yaml.safe_dump(data))
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect_home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "INFO"}
    logs = tmp_path / "logs"
    logs.mkdir()
    started: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> subprocess.Popen:
        handle = open(logs / f"{name}.log", "w")
        process = subprocess.Popen([PREFECT, *args], cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        started.append(process)
        return process

    def prefect(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([PREFECT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)

    try:
        server = start("server", "server", "start", "--host", "127.0.0.1", "--port", str(port))
        _wait_healthy(api, server)
        result = prefect("work-pool", "create", "local", "--type", "process")
        assert result.returncode == 0, result.stdout + result.stderr
        result = prefect("--no-prompt", "deploy", "--all")
        assert result.returncode == 0, result.stdout + result.stderr
        start("worker", "worker", "start", "--pool", "local")
        result = prefect("deployment", "run", "leccr/full", "--param", f"config={config_path}", "--watch",
                         timeout=900)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output + "\n--- worker log ---\n" + (logs / "worker.log").read_text()[-5000:]
        assert "Completed" in output
        # The report artifact as the UI shows it: its plots inlined, no link relative to report.md.
        query = json.dumps({"artifacts": {"key": {"any_": ["leccr-demo-report"]}}}).encode()
        request = urllib.request.Request(f"{api}/artifacts/filter", data=query,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            found = json.loads(response.read())
        assert found, "no report artifact published"
        markdown = found[0]["data"]
        assert "](data:image/png;base64," in markdown and "](plots/" not in markdown
        # leccr/sweep: a grid over an evaluate field reuses every trained model; one run per value
        result = prefect("deployment", "run", "leccr/sweep", "--param", f"config={config_path}", "--param",
                         'grid={"evaluate.alpha": [0.5, 1.0]}', "--param", "name=alpha", "--watch", timeout=900)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output + "\n--- worker log ---\n" + (logs / "worker.log").read_text()[-5000:]
    finally:
        for process in reversed(started):
            _stop(process)
    # The run wrote complete artifacts for every stage into the config's artifact root.
    record = json.loads((artifacts / "runs" / "demo.json").read_text())
    assert set(record) == {"dataset", "translate", "describe", "visual", "features", "train", "evaluate", "index"}
    assert "| leccr |" in (artifacts / "evaluate" / record["evaluate"] / "report.md").read_text()
    for stage, key in record.items():
        assert (artifacts / stage / key / "_manifest.json").is_file(), stage
    from leccr.runs import read_records

    swept = [r for r in read_records(artifacts) if r["sweep"] == "alpha"]
    assert sorted(r["swept"]["evaluate.alpha"] for r in swept) == [0.5, 1.0]
    assert {r["stages"]["train"]["status"] for r in swept} == {"cache_hit"}  # trained by leccr/full
    assert {r["stages"]["train"]["key"] for r in swept} == {record["train"]}
