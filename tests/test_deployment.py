"""The team set-up of docs/running.md, for real: `scripts/prefect-server.sh start` (a Prefect server, a process worker),
`prefect deploy`, `prefect deployment run leccr/full --watch` on the demo config, then the page's own stop
command — after which no process that start began may remain.

On every machine the server runs on Prefect's embedded SQLite (`LECCR_PREFECT_DATABASE=sqlite`), and
`leccr/sweep` runs too; where PostgreSQL is installed (Debian: `apt-get install postgresql`; CI installs it),
again on PostgreSQL, the team set-up, whose state then lives in a folder of the system's temporary folder
(the `postgres` user cannot enter a clone under a private folder)."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.search.conftest import skip_loudly

REPO = Path(__file__).parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")
SCRIPT = "scripts/prefect-server.sh"

pytestmark = pytest.mark.slow(seconds=100)  # each; the first test builds the module's artifacts


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _postgres_missing(state: Path) -> str | None:
    """Why the script cannot start PostgreSQL with its state in `state`, or None."""
    found = shutil.which("initdb") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None)
    if found is None:
        return "PostgreSQL is not installed (no initdb; Debian: apt-get install -y postgresql)"
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user to run PostgreSQL as"
        if subprocess.run(
            ["runuser", "-u", "postgres", "--", "test", "-x", str(state)], cwd="/", check=False
        ).returncode:
            return f"the postgres user cannot reach {state} (a parent folder is closed to other users)"
    return None


def documented_command(action: str) -> str:
    """docs/running.md's own `scripts/prefect-server.sh ACTION` line (the test runs what users are told to)."""
    pattern = re.compile(rf"^(bash {re.escape(SCRIPT)} {action})\b", re.MULTILINE)
    found = pattern.search((REPO / "docs" / "running.md").read_text(encoding="utf-8"))
    assert found, f"docs/running.md has no `bash {SCRIPT} {action}` line"
    return found.group(1)


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of every process on the machine (zombies have state Z)."""
    table = {}
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(status.parent.name)] = (int(fields[1]), fields[0])
    return table


def _tree(roots: set[int]) -> set[int]:
    """The roots and every descendant of theirs."""
    table, found = _processes(), set(roots)
    grew = True
    while grew:
        children = {pid for pid, (parent, _) in table.items() if parent in found} - found
        found |= children
        grew = bool(children)
    return found & set(table)


def _running(pids: set[int]) -> set[int]:
    table = _processes()
    return {pid for pid in pids if pid in table and table[pid][1] != "Z"}


@pytest.fixture(scope="module")
def deployment_config(demo_root, tmp_path_factory) -> tuple[Path, Path]:
    """One demo config and artifact root for both servers: every stage, on 6 items per split and 2 epochs
    (the deployment path, not the demo's numbers). The first cycle computes the stages, the second serves
    them from the store, so each database is tested for the deployment, once for the work."""
    from tests.conftest import demo_config_dict

    folder = tmp_path_factory.mktemp("deployment")
    data = demo_config_dict(demo_root, folder / "artifacts")
    data["dataset"]["max_items_per_split"] = 6
    data["train"].update(epochs=2, batch_size=16)
    path = folder / "demo.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, folder / "artifacts"


def test_prefect_deployment_run_leccr_full_and_sweep_on_sqlite(request, deployment_config):
    _deployment_cycle(request, deployment_config, "sqlite", with_sweep=True)


def test_prefect_deployment_run_leccr_full_on_postgresql(request, deployment_config):
    _deployment_cycle(request, deployment_config, "postgresql", with_sweep=False)


def _deployment_cycle(request, deployment_config, database: str, with_sweep: bool) -> None:
    config_path, artifacts = deployment_config
    # In the system's temporary folder, open to other users (pytest's own folders and a clone under
    # `mktemp -d` are not): PostgreSQL runs as the postgres user when we are root.
    state = Path(tempfile.mkdtemp(prefix="leccr-prefect-test-"))
    state.chmod(0o755)
    if database == "postgresql" and (reason := _postgres_missing(state)):
        shutil.rmtree(state)
        skip_loudly(request, reason)
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PREFECT": PREFECT,
        "LECCR_PREFECT_DIR": str(state),
        "LECCR_PREFECT_PORT": str(port),
        "LECCR_PREFECT_DATABASE": database,
        "LECCR_PG_PORT": str(_free_port()),
        "PREFECT_HOME": str(state),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
    }

    def run(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)

    def started() -> set[int]:
        pids = {
            int((state / f"{name}.pid").read_text())
            for name in ("server", "worker")
            if (state / f"{name}.pid").is_file()
        }
        postmaster = state / "postgres" / "data" / "postmaster.pid"
        if postmaster.is_file():
            pids.add(int(postmaster.read_text().split()[0]))
        return _tree(pids)

    try:
        result = run(["bash", SCRIPT, "start"])
        assert result.returncode == 0, result.stdout + result.stderr
        assert "started the Prefect server" in result.stdout
        assert ("started PostgreSQL" in result.stdout) == (database == "postgresql"), result.stdout
        status = run(["bash", SCRIPT, "status"])
        assert status.returncode == 0 and "worker: running" in status.stdout, status.stdout + status.stderr
        result = run([PREFECT, "--no-prompt", "deploy", "--all"])
        assert result.returncode == 0, result.stdout + result.stderr
        result = run(
            [PREFECT, "deployment", "run", "leccr/full", "--param", f"config={config_path}", "--watch"], timeout=900
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, output + "\n--- worker log ---\n" + (state / "worker.log").read_text()[-5000:]
        assert "Completed" in output
        # The report artifact as the UI shows it: its plots inlined, no link relative to report.md.
        query = json.dumps({"artifacts": {"key": {"any_": ["leccr-demo-report"]}}}).encode()
        request_ = urllib.request.Request(
            f"{api}/artifacts/filter", data=query, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request_, timeout=30) as response:
            found = json.loads(response.read())
        assert found, "no report artifact published"
        markdown = found[0]["data"]
        assert "](data:image/png;base64," in markdown and "](plots/" not in markdown
        assert found[0]["description"]  # every artifact says what it holds
        # Its flow runs are in the database asked for: PostgreSQL, or the SQLite file under PREFECT_HOME.
        assert bool(list(state.glob("*.db"))) == (database == "sqlite")
        if with_sweep:  # leccr/sweep: a grid over an evaluate field reuses every trained model; one run per value
            result = run(
                [
                    PREFECT,
                    "deployment",
                    "run",
                    "leccr/sweep",
                    "--param",
                    f"config={config_path}",
                    "--param",
                    'grid={"evaluate.alpha": [0.5, 1.0]}',
                    "--param",
                    "name=alpha",
                    "--watch",
                ],
                timeout=900,
            )
            output = (
                result.stdout + result.stderr + "\n--- worker log ---\n" + (state / "worker.log").read_text()[-5000:]
            )
            assert result.returncode == 0, output
    finally:
        before = started()
        stop = run(documented_command("stop").split(), timeout=120)
        left = _running(before)
        deadline = time.monotonic() + 5  # a process just signalled may take a moment to be reaped
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = _running(left)
        shutil.rmtree(state, ignore_errors=True)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert before and not left, f"still running after `{documented_command('stop')}`: {sorted(left)}\n{stop.stdout}"
    for name in ("worker", "server", "PostgreSQL") if database == "postgresql" else ("worker", "server"):
        assert f"{name}: stopped" in stop.stdout, stop.stdout
    # The run wrote complete artifacts for every stage into the config's artifact root.
    record = json.loads((artifacts / "runs" / "demo.json").read_text())
    methods = yaml.safe_load(config_path.read_text())["train"]["methods"]
    assert set(record) == {
        "dataset",
        "translate",
        "describe",
        "visual",
        "features",
        "evaluate",
        "index",
        *(f"train[{method}]" for method in methods),
    }  # one train artifact per method
    assert "| leccr |" in (artifacts / "evaluate" / record["evaluate"] / "report.md").read_text()
    for label, key in record.items():
        assert (artifacts / label.split("[")[0] / key / "_manifest.json").is_file(), label
    if not with_sweep:
        return
    from leccr.records.runs import read_records

    swept = [r for r in read_records(artifacts) if r["sweep"] == "alpha"]
    assert sorted(r["swept"]["evaluate.alpha"] for r in swept) == [0.5, 1.0]
    assert {r["stages"]["train[leccr]"]["status"] for r in swept} == {"cache_hit"}  # trained by leccr/full
    assert {r["stages"]["train[leccr]"]["key"] for r in swept} == {record["train[leccr]"]}
