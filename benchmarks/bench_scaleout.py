"""Scale-out benchmark (issue 10): the describe and features stages of the demo (configs/demo.yaml on
the generated demo data and tiny models) through the Prefect flow with the `ray` runner, 1 worker vs
2 workers, against the local (thread pool) runner.

    .venv/bin/python benchmarks/bench_scaleout.py [--stages describe,features] [--items-per-split N]
        [--describe-shard-size 4] [--features-shard-size 4] [--max-tokens N] [--views N] [--num-cpus 2]
        [--repeats 1] [--runners "ray x1,ray x2,local"] [--timeline] [--out results.json]

How it runs. The demo inputs are built once by the same code as `leccr demo` (`prepare_demo`; or
`--demo-root` to reuse a built one). Then, for each runner, one flow run of `leccr` with the
`--stages` (their upstream stages run too, untimed; they take well under a second) in a fresh
artifacts root, so nothing is a cache hit. `--max-tokens` and `--views` (the shipped prompts, cycled
and numbered) make each item's describe work longer, for shards whose work dominates:
  - local:    ThreadPoolTaskRunner, runner.shard_tasks 1 (the default local run; torch uses every core).
  - ray x1:   runner.shard_tasks 1, resources {describe, features}: num_cpus 1 -> one Ray task per stage.
  - ray x2:   runner.shard_tasks 2, the same resources -> two shard-slot tasks per stage run side by
              side (task i computes shards i, i+2, ...), then one finishing task merges the manifest.
Each Ray configuration gets its own local Ray, started by this script with `ray.init(num_cpus=...,
include_dashboard=False)` before the flow (prefect-ray reuses an initialised Ray) and shut down after
it, so every Ray run starts with fresh worker processes that load their models, as a first run does.
Ray's start is measured apart: `ray.init` seconds, then the first trivial task (a worker process
starting); after the flow, the torch thread count a 1-CPU Ray task sees. The temporary Prefect server
is started once by a trivial flow before anything is timed.

How to read the table. `seconds` of a stage is from the moment its inputs were done (the end of its
last upstream task, read from the Prefect API) to the end of its finishing task: task scheduling, a Ray
worker's first Prefect task (imports, Prefect client start-up), model loading, every shard and the
merge. `in tasks` starts instead at the start of the stage's first task (what remains once a worker has
picked it up). `shards` counts the data part files the stage committed (describe: its parts; features:
visual + text + description parts), so `shards/s` is throughput in the units the runner distributes.
`x2/x1` is seconds(1 worker) / seconds(2 workers): 2.0 would be perfect scaling. The fixed costs per
worker (imports, loading the model: each worker loads its own) and the merge do not shrink with more
workers, so the ratio approaches 2 only when a shard's work dwarfs them (real models, GPUs, more
items), and only when the cores are free. `flow s` is the whole flow run (storage probe and the
upstream stages included, Ray start excluded; its values fall on a ~2 s grid, some periodic wait at
the end of a Prefect flow run, not investigated).
Ray sets OMP_NUM_THREADS to a task's num_cpus, so a 1-CPU Ray task runs torch single-threaded while
the local runner's torch uses every core: with 2 CPUs, local ≈ ray x2 in compute, and the rest is
Ray's overhead. Use `--timeline` to see every task's start and end, `--repeats` on a noisy machine.

Long shards (`--stages describe --describe-shard-size 21 --max-tokens 256 --views 16`: the 84 demo items,
16 views each, 4 shards), on the same 2-core VM with nothing else running, 2026-11-29 (torch 2.13.0+cpu,
ray 2.60.0, prefect 3.7.7, prefect-ray 0.6.0):

    stage     runner workers shards  seconds shards/s  x2/x1 in tasks  x2/x1 shard s fixed s  flow s
    describe  ray          1      4    59.58     0.07           59.42          13.30    6.40    63.1
    describe  ray          2      4    40.74     0.10   1.46    40.60   1.46                    44.1
    describe  local  threads      4    89.43     0.04           89.42          21.12    4.94    90.1

  Over 5 runs x2/x1 was 1.46-1.74 (median 1.52), the fixed cost 1.5-6.8 s, one worker's shard 13.3-17.3 s.
  `shard s` is the median gap between a 1-worker run's shard commits; `fixed s` = seconds - shards x
  shard s. In the x2 runs each worker's shards took ~20 % longer than in x1, except in the 1.74 run.
  Per-process CPU time sampled over one run: the x1 worker spent 62.6 s on the stage, the two x2
  workers 75.3 s together on the same shards, so the VM's vCPUs run slower when both are busy; in the
  1.74 run the x1 worker itself spent 73.8 s (x2: 75.6 s). The driver, Prefect's temporary server and
  Ray's daemons took ~10 s of CPU per run besides.
  Before the runner gave workers the flow's Prefect API, each worker started a temporary Prefect server
  of its own before its first task: ~7 s, and each Ray stage waited ~10 s; on the demo's default short
  shards 2 workers ran at 0.88x of 1. The tiny LLaVA runs faster with one torch thread per process
  (Ray) than with two threads in one process (local).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("describe", "features")  # the default --stages


def _quiet_env(verbose: bool) -> None:
    """Before Prefect, Ray and transformers are imported (Ray workers inherit this environment)."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # a busy 2-core machine
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole machine from /proc/stat (None off Linux)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def cpu_busy_percent(before, after) -> float | None:
    """Share of the machine's CPU time that was busy between two _cpu_times() (ours and other work)."""
    if before is None or after is None or after[1] == before[1]:
        return None
    return round(100 * (after[0] - before[0]) / (after[1] - before[1]), 1)


def bench_config(demo_root: Path, artifacts: Path, items: int | None, describe_shard: int, features_shard: int,
                 runner: dict, max_tokens: int | None = None, views: int | None = None) -> dict:
    from leccr.prompts import default_views
    from tests.conftest import demo_config_dict

    data = demo_config_dict(demo_root, artifacts)
    data["dataset"]["max_items_per_split"] = items
    data["describe"]["shard_size"] = describe_shard
    if max_tokens is not None:
        data["describe"]["max_tokens"] = max_tokens
    if views is not None:  # more work per item: the shipped prompts, cycled, each view numbered
        for media in ("image", "video"):
            shipped = list(default_views(media).items())
            data["describe"][f"{media}_views"] = {
                f"{shipped[k % len(shipped)][0]}{k}": f"{shipped[k % len(shipped)][1]} (view {k})" for k in range(views)}
    data["features"]["shard_size"] = features_shard
    data["runner"] = runner
    return data


def runners(num_cpus: int, stages: tuple[str, ...]) -> dict[str, dict]:
    per_task = {stage: {"num_cpus": 1} for stage in stages}
    # Ray first: in one run with the local runner measured first, Ray x2 came out 1.43x instead of 1.74x.
    return {
        "ray x1": {"kind": "ray", "num_cpus": num_cpus, "shard_tasks": 1, "resources": per_task},
        "ray x2": {"kind": "ray", "num_cpus": num_cpus, "shard_tasks": 2, "resources": per_task},
        "local": {"kind": "local", "shard_tasks": 1},
    }


def start_ray(num_cpus: int, verbose: bool) -> dict:
    """Start a local Ray in this process; seconds of ray.init and of the first trivial task."""
    import ray

    from leccr.flows.pipeline import worker_prefect_env

    started = time.perf_counter()
    # As the flow's own runner does when it starts Ray: workers report to this process's Prefect API.
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=verbose,
             runtime_env={"env_vars": worker_prefect_env()})
    init_s = time.perf_counter() - started

    @ray.remote(num_cpus=1)
    def trivial() -> int:
        return os.getpid()

    started = time.perf_counter()
    ray.get(trivial.remote())
    return {"ray_init_s": round(init_s, 2), "first_task_s": round(time.perf_counter() - started, 2)}


def worker_threads() -> dict:
    """The torch thread count a 1-CPU Ray task sees (asked after the flow, so no worker is warmed for it)."""
    import ray

    @ray.remote(num_cpus=1)
    def threads() -> dict:
        import torch

        return {"torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}

    return ray.get(threads.remote())


def worker_imports_s() -> float:
    """Seconds a fresh Python process spends importing the flow, the two stages, torch and transformers:
    what every Ray worker process pays before its first Prefect task starts (a subprocess, outside Ray)."""
    import subprocess

    code = ("import time; t = time.perf_counter(); import leccr.flows.pipeline, leccr.stages.describe, leccr.stages.features, "
            "leccr.engines.mllm, leccr.features.vision, torch, transformers; print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return round(float(out.stdout.strip().splitlines()[-1]), 2)


def stage_spans(flow_run_id, flow_started: float, stages: tuple[str, ...]
                ) -> tuple[dict[str, dict[str, float]], list[list]]:
    """Per stage: `seconds` from the end of its last upstream task to the end of its finishing task, and
    `in_tasks` from the start of its first task to that end; every task run as [name, start, end] in
    seconds after the flow call (the timeline)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    from leccr.core.dag import get_stage

    with get_client(sync_client=True) as client:
        inner = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        ids = [flow_run_id] + [run.id for run in inner]  # Ray runs nest a flow; local runs do not
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)), limit=200)
    timeline = [[run.name, round(run.start_time.timestamp() - flow_started, 2) if run.start_time else None,
                 round(run.end_time.timestamp() - flow_started, 2) if run.end_time else None] for run in task_runs]
    timeline.sort(key=lambda row: (row[1] is None, row[1]))
    # A stage's tasks: "{stage}" (the finishing task), "{stage}-prepare", "{stage}-shards-{i}-of-{n}".
    ends = {run.name: run.end_time.timestamp() for run in task_runs if run.end_time is not None}
    spans = {}
    for stage in stages:
        ready = max(ends[up] for up in get_stage(stage).upstream)
        first = min(run.start_time.timestamp() for run in task_runs
                    if run.start_time is not None and (run.name == stage or run.name.startswith(f"{stage}-")))
        spans[stage] = {"seconds": ends[stage] - ready, "in_tasks": ends[stage] - first}
    return spans, timeline


def shard_parts(artifact: Path) -> list[Path]:
    return [p for p in artifact.rglob("part-*.parquet") if "_errors" not in p.parts]


def shard_seconds(parts: list[Path]) -> float | None:
    """Compute seconds of one shard in a 1-worker run: the median gap between consecutive shard
    commits (file modification times). None with fewer than 2 shards."""
    commits = sorted(p.stat().st_mtime for p in parts)
    gaps = [b - a for a, b in zip(commits, commits[1:])]
    return statistics.median(gaps) if gaps else None


def run_one(label: str, data: dict, folder: Path, num_cpus: int, verbose: bool, stages: tuple[str, ...]) -> dict:
    import yaml

    from leccr.flows.pipeline import experiment_flow

    folder.mkdir(parents=True)
    config = folder / "bench.yaml"
    config.write_text(yaml.safe_dump(data))
    result: dict = {"runner": label}
    if data["runner"]["kind"] == "ray":
        result["ray_start"] = start_ray(num_cpus, verbose)
    try:
        started, wall = time.perf_counter(), time.time()
        state = experiment_flow(config=str(config), stages=list(stages), return_state=True)
        result["flow_s"] = round(time.perf_counter() - started, 2)
        paths = state.result()
        if data["runner"]["kind"] == "ray":
            result["ray_start"]["worker"] = worker_threads()
    finally:
        if data["runner"]["kind"] == "ray":
            import ray

            ray.shutdown()
    spans, timeline = stage_spans(state.state_details.flow_run_id, wall, stages)
    result["stages"] = {}
    for stage in stages:
        parts = shard_parts(Path(paths[stage]))
        result["stages"][stage] = {"seconds": round(spans[stage]["seconds"], 2),
                                   "in_tasks": round(spans[stage]["in_tasks"], 2), "shards": len(parts)}
        per_shard = shard_seconds(parts)
        if label != "ray x2" and per_shard is not None:
            # one worker commits its shards one after another: what is left is the stage's fixed cost
            result["stages"][stage].update(shard_s=round(per_shard, 2),
                                           fixed_s=round(spans[stage]["seconds"] - len(parts) * per_shard, 2))
    result["tasks"] = timeline
    return result


def warm_prefect() -> float:
    """Start the temporary Prefect server (once per process) with a trivial flow; its seconds."""
    from prefect import flow

    @flow(name="bench-scaleout-warm-up")
    def nothing() -> int:
        return 0

    started = time.perf_counter()
    nothing()
    return round(time.perf_counter() - started, 2)


def table(results: list[dict], stages: tuple[str, ...]) -> str:
    by_runner: dict[str, list[dict]] = {}
    for r in results:
        by_runner.setdefault(r["runner"], []).append(r)

    def median(label: str, stage: str, what: str = "seconds") -> float | None:
        values = [r["stages"][stage][what] for r in by_runner.get(label, []) if what in r["stages"][stage]]
        return statistics.median(values) if values else None

    def ratio(label: str, stage: str, what: str) -> str:
        if label != "ray x2" or "ray x1" not in by_runner:
            return ""
        return f"{median('ray x1', stage, what) / median(label, stage, what):.2f}"

    def cell(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}"

    lines = [f"{'stage':<9} {'runner':<6} {'workers':>7} {'shards':>6} {'seconds':>8} {'shards/s':>8} {'x2/x1':>6}"
             f" {'in tasks':>8} {'x2/x1':>6} {'shard s':>7} {'fixed s':>7} {'flow s':>7}"]
    for stage in stages:
        for label, runs in by_runner.items():
            seconds = median(label, stage)
            shards = runs[0]["stages"][stage]["shards"]
            workers = "threads" if label == "local" else label.split("x")[1]
            flow_s = statistics.median(r["flow_s"] for r in runs)
            in_tasks = median(label, stage, "in_tasks")
            lines.append(f"{stage:<9} {label.split()[0]:<6} {workers:>7} {shards:>6} {seconds:>8.2f} "
                         f"{shards / seconds:>8.2f} {ratio(label, stage, 'seconds'):>6} "
                         f"{in_tasks:>8.2f} {ratio(label, stage, 'in_tasks'):>6} "
                         f"{cell(median(label, stage, 'shard_s')):>7} {cell(median(label, stage, 'fixed_s')):>7} "
                         f"{flow_s:>7.1f}")
        lines.append(break_even(stage, median))
    return "\n".join(line for line in lines if line)


def break_even(stage: str, median) -> str:
    """From the measured fixed cost F and per-shard seconds: with N shards, 1 Ray worker takes F + N*S1,
    2 take F + N*S1/2, the local runner N*S_local (no fixed cost past its model load)."""
    fixed, s1, s_local = median("ray x1", stage, "fixed_s"), median("ray x1", stage, "shard_s"), median("local", stage, "shard_s")
    if fixed is None or s1 is None:
        return ""
    parts = [f"  {stage}: fixed cost on Ray {fixed:.1f} s per stage, {s1:.2f} s per shard on 1 worker; "
             f"2 workers reach x2/x1 >= 1.7 from {max(0.0, fixed / (0.15 * s1) * 0.7):.0f} shards "
             f"({max(0.0, 4.67 * fixed):.0f} s of shard work)"]
    if s_local is not None and s_local > s1 / 2:
        parts.append(f"; beat the local runner ({s_local:.2f} s per shard) from "
                     f"{fixed / (s_local - s1 / 2):.0f} shards")
    return "".join(parts)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items-per-split", type=int, default=None,
                        help="dataset.max_items_per_split (default: every demo item, 50/17/17)")
    parser.add_argument("--describe-shard-size", type=int, default=4, help="items per describe shard")
    parser.add_argument("--features-shard-size", type=int, default=4, help="items per visual/description shard")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--stages", default=",".join(STAGES), help="stages to time (comma-separated; upstream ones run untimed)")
    parser.add_argument("--max-tokens", type=int, help="describe.max_tokens (default: the demo's 24)")
    parser.add_argument("--views", type=int, help="describe views (prompts) per item (default: the 4 shipped ones)")
    parser.add_argument("--repeats", type=int, default=1, help="flow runs per runner (median reported)")
    parser.add_argument("--runners", default="local,ray x1,ray x2", help="comma-separated subset")
    parser.add_argument("--demo-root", type=Path, help="a built demo folder (data/, models/) to reuse")
    parser.add_argument("--out", type=Path, help="write the raw results as JSON")
    parser.add_argument("--timeline", action="store_true",
                        help="print every task run's start and end (seconds after the flow call)")
    parser.add_argument("--verbose", action="store_true", help="keep Prefect/Ray/transformers logs")
    args = parser.parse_args(argv)
    _quiet_env(args.verbose)
    sys.path.insert(0, str(REPO))
    os.chdir(REPO)

    import torch

    cpu_before = _cpu_times()
    report: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                "load_avg_before": [round(x, 2) for x in os.getloadavg()],
                                "driver_torch_threads": torch.get_num_threads()},
                    "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    wanted = [name.strip() for name in args.runners.split(",")]
    stages = tuple(name.strip() for name in args.stages.split(","))
    configs = {name: runner for name, runner in runners(args.num_cpus, stages).items() if name in wanted}
    with tempfile.TemporaryDirectory(prefix="bench-scaleout-") as tmp:
        tmp = Path(tmp)
        demo_root = args.demo_root
        if demo_root is None:
            from leccr.cli.demo import prepare_demo

            started = time.perf_counter()
            demo_root = tmp / "demo"
            prepare_demo(demo_root)
            report["demo_build_s"] = round(time.perf_counter() - started, 1)
        report["prefect_server_start_s"] = warm_prefect()
        report["worker_imports_s"] = worker_imports_s()
        results = []
        for repeat in range(args.repeats):
            for label, runner in configs.items():
                data = bench_config(demo_root.absolute(), tmp / f"{label.replace(' ', '')}-{repeat}" / "artifacts",
                                    args.items_per_split, args.describe_shard_size, args.features_shard_size, runner,
                                    args.max_tokens, args.views)
                result = run_one(label, data, tmp / f"{label.replace(' ', '')}-{repeat}", args.num_cpus, args.verbose,
                                 stages)
                results.append(result)
                print(json.dumps({k: v for k, v in result.items() if k != "tasks"}), flush=True)
                if args.timeline:
                    for name, start, end in result["tasks"]:
                        print(f"    {name:<28} {start:>7} -> {end:>7}")
    report["runs"] = results
    report["machine"]["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    report["machine"]["cpu_busy_percent"] = cpu_busy_percent(cpu_before, _cpu_times())
    ray_starts = [r["ray_start"] for r in results if "ray_start" in r]
    print()
    print(table(results, stages))
    if ray_starts:
        init_s = statistics.median(r["ray_init_s"] for r in ray_starts)
        print(f"\nRay start (separate, not in any row): ray.init {init_s:.2f} s, "
              f"first trivial task {statistics.median(r['first_task_s'] for r in ray_starts):.2f} s "
              f"(median of {len(ray_starts)}); a 1-CPU Ray task sees {ray_starts[0]['worker']}; "
              f"driver torch threads {report['machine']['driver_torch_threads']}")
    print(f"A fresh interpreter imports the flow, the stages, torch and transformers in {report['worker_imports_s']} s "
          "(every Ray worker pays it before its first task: inside the Ray rows)")
    machine = report["machine"]
    print(f"Prefect temporary server start (once): {report['prefect_server_start_s']} s; load average before/after: "
          f"{machine['load_avg_before']} / {machine['load_avg_after']}; machine CPU busy over the run (this benchmark "
          f"and anything else): {machine['cpu_busy_percent']} %")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
