"""A single-stage rerun costs its stage: the fixed cost of one `leccr run` over its stages' own time.

    python benchmarks/bench_run_overhead.py                 # the demo's world at 300 images, tiny models, CPU
    python benchmarks/bench_run_overhead.py --images 1000
    python benchmarks/bench_run_overhead.py --no-prefect    # skip the Prefect baseline (a temporary server)

Each command runs as a user types it, in a fresh interpreter: `leccr run --config C --stage S --force S`
recomputes stage S (its upstream stages are cache hits). Its fixed cost is the command's wall time less
the seconds the stages it computed took (their run record's `seconds`): interpreter start, imports,
config, keys, the cache checks, the run record. Measured for dataset, translate and visual, each
`--repeat` times (the median is printed), and for a run whose every stage is a hit; then once for
translate through Prefect (`--prefect`, a temporary server in a fresh PREFECT_HOME), the baseline the
in-process driver replaced. The goal: a fixed cost of at most 3 s on a 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOAL_SECONDS = 3.0


def _config(models: Path, data: Path, artifacts: Path, path: Path) -> Path:
    import yaml

    text = (REPO / "configs" / "demo.yaml").read_text().replace("artifacts/demo/models", str(models))
    config = yaml.safe_load(text)
    config["artifacts_root"] = str(artifacts)
    config["dataset"]["path"] = str(data)
    path.write_text(yaml.safe_dump(config))
    return path


def _newest_record(artifacts: Path) -> dict:
    records = sorted((artifacts / "runs" / "records").glob("*.json"))
    return json.loads(records[-1].read_text(encoding="utf-8"))


def leccr_run(config: Path, artifacts: Path, args: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, seconds of the stages it computed, the run's outcome) of one `leccr run` command."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "leccr.cli", "run", "--config", str(config), *args], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"leccr run {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    record = _newest_record(artifacts)
    stage_seconds = sum(entry["seconds"] for entry in record["stages"].values() if entry["status"] == "computed")
    return wall, stage_seconds, record["outcome"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300, help="images of the demo's world (default 300)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per in-process case (the median is printed)")
    parser.add_argument("--no-prefect", action="store_true", help="skip the Prefect baseline")
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep it (default: a temp folder)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from leccr.cli.demo import prepare_demo
    from leccr.datasets.demo import generate_demo

    work = args.keep or Path(tempfile.mkdtemp(prefix="leccr-bench-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    models = Path(prepare_demo(work / "demo")["data"]).parent / "models"
    data = generate_demo(work / f"data-{args.images}", num_images=args.images)
    artifacts = work / "artifacts"
    config = _config(models, data, artifacts, work / "config.yaml")
    env = {name: value for name, value in os.environ.items() if not name.startswith("PREFECT_")}
    env |= {"PYTHONPATH": str(REPO), "PREFECT_HOME": str(work / "prefect-home"),
            "PREFECT_PROFILES_PATH": str(work / "prefect-home" / "profiles.toml")}  # no user profile's server

    wall, _, _ = leccr_run(config, artifacts, ["--stage", "visual", "--stage", "translate"], env)
    print(f"demo world: {args.images} images; first run (dataset, translate, visual) {wall:.1f} s; work folder {work}")
    print(f"\n| command | wall s | stages' own s | fixed cost s |\n|---|---|---|---|")
    rows = []
    for stage in ("dataset", "translate", "visual"):
        runs = [leccr_run(config, artifacts, ["--stage", stage, "--force", stage], env) for _ in range(args.repeat)]
        wall = statistics.median(r[0] for r in runs)
        overhead = statistics.median(r[0] - r[1] for r in runs)
        rows.append((f"leccr run --stage {stage} --force {stage}", wall, wall - overhead, overhead))
    runs = [leccr_run(config, artifacts, ["--stage", "visual", "--stage", "translate"], env)
            for _ in range(args.repeat)]
    rows.append(("leccr run --stage visual --stage translate (all hits)", statistics.median(r[0] for r in runs), 0.0,
                 statistics.median(r[0] - r[1] for r in runs)))
    for name, wall, own, overhead in rows:
        print(f"| {name} | {wall:.2f} | {own:.2f} | {overhead:.2f} |")
    worst = max(row[3] for row in rows)
    translate_overhead = rows[1][3]
    if not args.no_prefect:
        wall, own, _ = leccr_run(config, artifacts, ["--stage", "translate", "--force", "translate", "--prefect"], env)
        print(f"| leccr run --stage translate --force translate --prefect (temporary server) | {wall:.2f} | "
              f"{own:.2f} | {wall - own:.2f} |")
        print(f"\nPrefect path / in-process path, fixed cost of the translate rerun: "
              f"{(wall - own) / translate_overhead:.1f}x ({wall - own:.1f} s / {translate_overhead:.2f} s)")
    print(f"largest in-process fixed cost: {worst:.2f} s; goal at most {GOAL_SECONDS:.0f} s: "
          + ("met" if worst <= GOAL_SECONDS else "NOT met"))
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
