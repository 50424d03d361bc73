"""`leccr run` in this process (the default) and as a Prefect flow run (`--prefect`) are one driver: the same
stage lines on the console, the same run records, the same one-line failure."""
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

from leccr.cli import main
from leccr.cli.run import prefect_api_url
from leccr.records.runs import read_records

REPO = Path(__file__).parents[1]
STAGE_LINE = re.compile(r"^\d\d:\d\d:\d\d ")


def _stage_lines(err: str, root: Path) -> list[str]:
    """The stages' own lines, without the clock, the time they took and the artifact root."""
    lines = [re.sub(r"[\d.]+ ?(s\b|items/s)", "#", line[9:]).replace(str(root), "ROOT")
             for line in err.splitlines() if STAGE_LINE.match(line)]
    return sorted(lines)


def _describe_config(demo_config, demo_root, keep_every: int) -> Path:
    """The demo config importing the scene descriptions of every `keep_every`-th item only."""
    path, _ = demo_config
    data = yaml.safe_load(path.read_text())
    descriptions = json.loads((demo_root / "scene_descriptions.json").read_text())
    items = sorted(descriptions["descriptions"])
    descriptions["descriptions"] = {item: descriptions["descriptions"][item] for item in items[::keep_every]}
    imported = path.parent / f"descriptions-{keep_every}.json"
    imported.write_text(json.dumps(descriptions))
    data["describe"] = {"engine": "import", "import_path": str(imported), "max_error_rate": 0.1}
    data["dataset"]["max_items_per_split"] = 6
    path.write_text(yaml.safe_dump(data))
    return path


def _records(root: Path) -> list[dict]:
    """Each run's record (oldest first) as both paths must write it: outcome, error, each stage's key and status."""
    return [{"outcome": r["outcome"], "error": (r["error"] or "").replace(str(root), "ROOT"),
             "stages": {label: (entry["key"], entry["status"]) for label, entry in r["stages"].items()}}
            for r in read_records(root)]


def test_both_paths_print_record_and_fail_alike(demo_config, demo_root, tmp_path, prefect_api, capsys):
    from prefect.client.orchestration import get_client

    roots = {"here": tmp_path / "here", "prefect": tmp_path / "prefect"}
    options = {"here": [], "prefect": ["--prefect"]}
    with get_client(sync_client=True) as client:
        flow_runs = len(client.read_flow_runs())
    runs = {}
    # A run that completes, then one that fails: half the items have no description (past max_error_rate).
    for keep_every in (1, 2):
        config = str(_describe_config(demo_config, demo_root, keep_every))
        for path in ("here", "prefect"):
            argv = ["run", "--config", config, "--stage", "describe", "--set", f"artifacts_root={roots[path]}"]
            status = main(argv + options[path])
            runs[path, keep_every] = status, capsys.readouterr()
    with get_client(sync_client=True) as client:
        assert len(client.read_flow_runs()) == flow_runs + 2  # the in-process runs made none

    for keep_every, expected in ((1, 0), (2, 2)):
        (here_status, here), (prefect_status, prefect) = runs["here", keep_every], runs["prefect", keep_every]
        assert here_status == prefect_status == expected, (here, prefect)
        assert prefect.out.startswith("Running through Prefect (--prefect).\n")
        assert prefect.out.split("\n", 1)[1].replace(str(roots["prefect"]), "ROOT") == \
            here.out.replace(str(roots["here"]), "ROOT")  # the same artifacts and hint
        here_lines, prefect_lines = _stage_lines(here.err, roots["here"]), _stage_lines(prefect.err, roots["prefect"])
        assert here_lines == prefect_lines and any("describe: computing" in line for line in here_lines), here.err
        errors = [line.replace(str(roots["here"]), "ROOT") for line in here.err.splitlines()
                  if line.startswith("leccr: ")]
        assert errors == [line.replace(str(roots["prefect"]), "ROOT") for line in prefect.err.splitlines()
                          if line.startswith("leccr: ")]
        if expected:
            assert re.match(r"leccr: error: describe: \d+ of 18 items failed", errors[0]), errors
    assert _records(roots["here"]) == _records(roots["prefect"])
    assert [r["outcome"] for r in _records(roots["here"])] == ["completed", "failed"]


def test_a_run_starts_no_prefect_unless_asked(demo_config, tmp_path, monkeypatch):
    """In a fresh interpreter: a computing run imports no Prefect; PREFECT_API_URL, in the environment
    or in the active Prefect profile, selects the Prefect path."""
    config, artifacts = demo_config
    code = ("import sys; from leccr.cli import main; rc = main(sys.argv[1:]); "
            "print('PREFECT_IMPORTED' if 'prefect' in sys.modules else 'NO_PREFECT'); sys.exit(rc)")
    run = subprocess.run([sys.executable, "-c", code, "run", "--config", str(config), "--stage", "translate"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "NO_PREFECT" in run.stdout and "translate       computed in" in run.stderr
    assert [r["outcome"] for r in read_records(artifacts)] == ["completed"]
    # As the program (`leccr`, `python -m leccr.cli`) it ends without tearing its modules down: its exit
    # code and every line it wrote are still there.
    def program(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "leccr.cli", "run", "--config", str(config), *args], cwd=REPO,
                              capture_output=True, text=True, timeout=300)

    run = program("--stage", "translate", "--force", "translate")
    assert run.returncode == 0 and run.stdout.splitlines()[-1].endswith('"SELECT * FROM translate LIMIT 5"'), run
    run = program("--stage", "nosuch")
    assert run.returncode == 2 and run.stderr.startswith("leccr: error: unknown stage 'nosuch'"), run
    assert [r["outcome"] for r in read_records(artifacts)] == ["completed", "completed"]

    for name in ("PREFECT_API_URL", "PREFECT_PROFILE", "PREFECT_PROFILES_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    assert prefect_api_url() is None
    (tmp_path / "prefect-home").mkdir()
    (tmp_path / "prefect-home" / "profiles.toml").write_text(
        'active = "team"\n[profiles.team]\nPREFECT_API_URL = "http://prefect.example:4200/api"\n'
        '[profiles.ephemeral]\nPREFECT_SERVER_ALLOW_EPHEMERAL_MODE = "true"\n')
    assert prefect_api_url() == "http://prefect.example:4200/api"
    monkeypatch.setenv("PREFECT_PROFILE", "ephemeral")
    assert prefect_api_url() is None
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert prefect_api_url() == "http://127.0.0.1:4200/api"
