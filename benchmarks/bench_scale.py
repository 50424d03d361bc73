"""The whole DAG at N items: cost per item and peak memory of every stage, as N grows to Multi30K's size.

    python benchmarks/bench_scale.py                          # N = 1,000, 5,000, 31,014; 1 epoch per method
    python benchmarks/bench_scale.py --items 300 1000         # quicker
    python benchmarks/bench_scale.py --items 1000 --epochs 2  # a training epoch's time vs the pairs it sees

For each N the demo generator writes N images in Multi30K's proportions (31,014 gives its 29,000 train /
1,014 val / 1,000 test images), 5 English captions each and MT-style captions in 3 target languages; the
run uses configs/demo_scene.yaml: tiny models, imported translations, the generator's scene descriptions
(a real MLLM's cost is estimated in docs/performance.md, not run here). Every stage runs in a process of
its own (its upstream stages are cache hits there), so the peak RSS printed is that stage's alone:

    stage           the job (train: one per method, `train.epochs` epochs at the preset's batch size)
    wall s          the stage's wall time as the runner timed it (model loading and the manifest
                    included; not the process start or the upstream stages' hit checks)
    CPU s           the CPU time (user + system, every thread) the process spent in that stage
    load            the machine's 1-minute load average during the stage (others' work included)
    throughput      units per wall second: items (N); for train the pairs trained on (steps x batch: an
                    epoch's incomplete last batch is dropped); for evaluate the test pairs (each
                    language's test captions x test items: one score matrix per language)
    ratio, CPU r    the stage's wall (CPU) seconds per unit at this N over the same at the run's
                    smallest N: ratios within one run of this benchmark
    peak RSS        max RSS of the stage's process (the kernel's count, wait4); it includes mapped
                    files: torch's libraries (~0.4 GiB) and the pages of memory-mapped features read
    anon            peak anonymous RSS (sampled every 50 ms): the memory the process itself holds
    written, B/unit bytes of new files in the stage's artifact, and per unit (hard links to an upstream's
                    files are not new; the Arrow copy of the features that train makes once, for its
                    memory-mapped reads, is counted apart as `cache`)

The last line reads `worst per-item ratio: X (stage S); peak RSS: Y GiB (stage T)`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
STAGES = ("dataset", "translate", "describe", "visual", "features", "train", "evaluate", "index")
GIB = 2**30
RERUN_ENV = "LECCR_BENCH_RERUN"  # set for --rerun's children


def scale_config(
    models: Path, data: Path, descriptions: Path, artifacts: Path, epochs: int, threads: int | None
) -> dict:
    """configs/demo_scene.yaml pointed at this N's data, `epochs` epochs and no early stopping (and
    `threads` torch threads for training, where given)."""
    import yaml

    text = (REPO / "configs" / "demo_scene.yaml").read_text().replace("artifacts/demo/models", str(models))
    config = yaml.safe_load(text)
    config["name"] = f"scale-{data.name}"
    config["artifacts_root"] = str(artifacts)
    config["dataset"]["path"] = str(data)
    config["describe"]["import_path"] = str(descriptions)
    config["train"].update(epochs=epochs, early_stopping_patience=None)
    if threads is not None:
        config["train"]["threads"] = threads
    return config


# ------------------------------------------------------------------------------- one stage, in a child
class MemorySampler:
    """Peak resident memory of this process, split as /proc/self/status counts it: RssAnon (what the
    process itself holds) and VmRSS (that plus file pages it maps: a memory-mapped Arrow file's pages
    count there once touched, though the kernel may drop them at any time). Sampled every 50 ms."""

    def __init__(self) -> None:
        import threading

        self.peak_anon = self.peak_total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        self.peak_anon = max(self.peak_anon, int(fields["RssAnon"].split()[0]) * 1024)
        self.peak_total = max(self.peak_total, int(fields["VmRSS"].split()[0]) * 1024)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def child(config_file: Path, job_label: str) -> int:
    """Run one job on its finished upstream artifacts and print its figures as one JSON line. The
    upstream stages are looked up first (cache hits), so the figures are the job's own."""
    import resource

    from leccr.config import parse_config
    from leccr.core.artifact import MethodArtifacts, Store
    from leccr.core.dag import get_stage
    from leccr.core.driver import Job, run_pipeline
    from leccr.core.execute import run_stage
    from leccr.core.fingerprint import fingerprinter_for

    memory = MemorySampler()
    cfg = parse_config(json.loads(config_file.read_text()))
    job = Job.from_label(job_label)
    stage = get_stage(job.stage)
    fingerprints = fingerprinter_for(cfg.artifacts_root)
    rerun = os.environ.get(RERUN_ENV) == "1"
    inputs = {}
    if rerun:  # the stage again on what its upstream stages made last (made by other code, maybe)
        store = Store(cfg.artifacts_root)
        for up in stage.upstream:
            inputs[up] = MethodArtifacts(up, store.latest_methods(up)) if get_stage(up).per_method else store.latest(up)
    else:
        done = run_pipeline(cfg, list(stage.upstream), fingerprints=fingerprints) if stage.upstream else {}
        for up in stage.upstream:
            if get_stage(up).per_method:
                inputs[up] = MethodArtifacts(
                    up, {label[len(up) + 1 : -1]: o.artifact for label, o in done.items() if label.startswith(f"{up}[")}
                )
            else:
                inputs[up] = done[up].artifact
    before, load_before = resource.getrusage(resource.RUSAGE_SELF), os.getloadavg()[0]
    outcome = run_stage(cfg, job, inputs, force=rerun, fingerprints=fingerprints)
    after, load_after = resource.getrusage(resource.RUSAGE_SELF), os.getloadavg()[0]
    memory.stop()
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(
        "BENCH "
        + json.dumps(
            {
                "job": job_label,
                "seconds": outcome.seconds,
                "cache_hit": outcome.cache_hit,
                "cpu": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
                "load": (load_before + load_after) / 2,
                "path": str(outcome.artifact.path),
                "anon": memory.peak_anon,
                "total": memory.peak_total,
                "workers_rss": workers,
                "summary": outcome.artifact.manifest.summary,
            }
        )
    )
    return 0


def run_child(config_file: Path, job_label: str, log: Path, threads: int | None = None, rerun: bool = False) -> dict:
    """The child's figures, its wall time, and its peak RSS as the kernel counted it (wait4)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(config_file), job_label]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if rerun:
        env[RERUN_ENV] = "1"
    if threads is not None:  # torch's intra-op threads in every stage (train: train.threads, set in the config)
        env["OMP_NUM_THREADS"] = str(threads)
    started = time.perf_counter()
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=out, env=env, cwd=REPO)
        stdout = process.stdout.read().decode()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    with open(log, "a") as out:
        out.write(stdout)
    if process.returncode != 0:
        raise SystemExit(f"{job_label} failed (exit {process.returncode}); see {log}")
    line = next(line for line in stdout.splitlines() if line.startswith("BENCH "))
    figures = json.loads(line[len("BENCH ") :])
    figures["wall"] = wall
    figures["tree_rss"] = usage.ru_maxrss * 1024  # the child and its waited-for descendants
    return figures


# ------------------------------------------------------------------------------- bytes
def new_bytes(folder: Path, seen: set[tuple[int, int]]) -> tuple[int, int, int]:
    """(bytes of files first seen here, bytes of hard links to files seen before, Arrow-cache bytes)."""
    fresh = linked = cache = 0
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        stat = path.stat()
        ident = (stat.st_dev, stat.st_ino)
        if ident in seen:
            linked += 0 if ".arrow-cache" in path.parts else stat.st_size
        elif ".arrow-cache" in path.parts:
            cache += stat.st_size
        else:
            fresh += stat.st_size
        seen.add(ident)
    return fresh, linked, cache


# ------------------------------------------------------------------------------- units
def test_pairs(evaluate_dir: Path) -> int:
    """(caption, item) pairs of the test split that evaluate scores: each language's test captions x the
    test items (one score matrix per language; both directions rank it)."""
    import pyarrow.parquet as pq

    metrics = pq.read_table(evaluate_dir / "metrics.parquet", columns=["lang", "n_texts", "n_items"]).to_pylist()
    return sum({row["lang"]: row["n_texts"] * row["n_items"] for row in metrics}.values())


def units_of(label: str, figures: dict, n_items: int, artifacts: Path) -> tuple[int, str]:
    if label.startswith("train["):  # pairs trained on: steps x batch (an epoch's incomplete last batch is dropped)
        info = json.loads((Path(figures["path"]) / label[6:-1] / "train_info.json").read_text())
        return info["steps"] * info["batch_size"], "pairs"
    if label == "evaluate":
        return test_pairs(Path(figures["path"])), "test pairs"
    return n_items, "items"


# ------------------------------------------------------------------------------- one N
def prepare(work: Path, n_items: int) -> tuple[Path, Path]:
    from leccr.datasets.demo import MULTI30K_SPLITS, generate_demo, split_fractions, write_scene_descriptions

    started = time.perf_counter()
    data = generate_demo(
        work / f"data-{n_items}", num_images=n_items, num_videos=0, fractions=split_fractions(MULTI30K_SPLITS)
    )
    descriptions = write_scene_descriptions(work / f"scene-{n_items}.json", num_images=n_items, num_videos=0)
    print(f"  data for N={n_items:,}: {time.perf_counter() - started:.1f} s ({data})", flush=True)
    return data, descriptions


def run_n(
    work: Path,
    models: Path,
    n_items: int,
    epochs: int,
    methods: list[str],
    threads: int | None,
    rerun: list[str] | None = None,
    keep: Callable[[list[dict]], None] = lambda rows: None,
) -> list[dict]:
    """Every stage at N items, each in its own process; with `rerun`, only those stages (or one method's
    training, `train[leccr]`) again, on the artifacts an earlier run of this work folder left (its
    upstream stages are not looked up or run). `keep(rows)` is called after each stage: a run stopped
    half-way keeps what it measured."""
    artifacts = work / f"artifacts-{n_items}"
    config_file = work / f"config-{n_items}.json"
    seen: set[tuple[int, int]] = set()
    if rerun is None:
        data, descriptions = prepare(work, n_items)
        shutil.rmtree(artifacts, ignore_errors=True)
        config = scale_config(models, data, descriptions, artifacts, epochs, threads)
        config["train"]["methods"] = methods
        config_file.write_text(json.dumps(config))
    else:
        methods = json.loads(config_file.read_text())["train"]["methods"]
        new_bytes(artifacts, seen)  # what is there already is not written by the rerun
    log = work / f"log-{n_items}.txt"
    rows = []
    labels = [s for s in STAGES if s != "train"]
    labels[labels.index("evaluate") : labels.index("evaluate")] = [f"train[{m}]" for m in methods]
    if rerun is not None:
        labels = [label for label in labels if label in rerun or label.split("[")[0] in rerun]
    for label in labels:
        figures = run_child(config_file, label, log, threads, rerun=rerun is not None)
        fresh, linked, cache = new_bytes(Path(figures["path"]), seen)
        if label.startswith("train["):  # the Arrow cache train writes lives in the features artifact
            _, _, cache = new_bytes(Path(figures["path"]).parents[1] / "features", seen)
        units, unit = units_of(label, figures, n_items, artifacts)
        row = {
            "n": n_items,
            "stage": label,
            "seconds": figures["seconds"],
            "cpu": figures["cpu"],
            "load": figures["load"],
            "process": figures["wall"],
            "units": units,
            "unit": unit,
            "rss": figures["tree_rss"],
            "anon": figures["anon"],
            "workers_rss": figures["workers_rss"],
            "written": fresh,
            "linked": linked,
            "cache": cache,
        }
        rows.append(row)
        keep(rows)
        print(
            f"  {label:<16} {row['seconds']:8.1f} s  CPU {row['cpu']:8.1f} s  "
            f"{units / max(row['seconds'], 1e-9):10.1f} {unit}/s  RSS {row['rss'] / GIB:5.2f} GiB "
            f"(anon {row['anon'] / GIB:5.2f})  written {fresh / 2**20:8.1f} MiB  load {row['load']:.1f}",
            flush=True,
        )
    return rows


def keep_rows(path: Path, rows: list[dict]) -> None:
    """The table so far, replaced atomically: a long run stopped half-way keeps every stage it measured."""
    from leccr.core.io import atomic_write_text

    atomic_write_text(path, json.dumps(rows, indent=1))


def rerun_label(text: str) -> str:
    """A stage name or one method's training (`train[leccr]`)."""
    if text in STAGES or (text.startswith("train[") and text.endswith("]") and len(text) > 7):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is neither a stage ({', '.join(STAGES)}) nor train[METHOD]")


def report(rows: list[dict], cost: str = "seconds") -> str:
    """The table, each stage's cost per unit as a ratio of its cost at the smallest N (wall and CPU),
    and the line a script checks: the worst `cost` ratio and the largest peak RSS at the largest N."""
    smallest = min(r["n"] for r in rows)
    base = {r["stage"]: r for r in rows if r["n"] == smallest}

    def ratio(row: dict, field: str) -> float:
        first = base[row["stage"]]
        return (row[field] / row["units"]) / max(first[field] / first["units"], 1e-12)

    lines = [
        f"{'N':>7} {'stage':<16} {'wall s':>8} {'CPU s':>8} {'load':>5} {'throughput':>13} {'units':>9} "
        f"{'unit':<10} {'ratio':>6} {'CPU r':>6} {'peak RSS':>9} {'anon':>7} {'written':>10} "
        f"{'B/unit':>8} {'cache':>9}"
    ]
    worst = (0.0, "")
    for r in rows:
        wall_ratio, cpu_ratio = ratio(r, "seconds"), ratio(r, "cpu")
        chosen = wall_ratio if cost == "seconds" else cpu_ratio
        if r["n"] != smallest and chosen > worst[0]:
            worst = (chosen, f"{r['stage']} at N={r['n']:,}")
        lines.append(
            f"{r['n']:>7,} {r['stage']:<16} {r['seconds']:8.1f} {r['cpu']:8.1f} {r['load']:5.1f} "
            f"{r['units'] / max(r['seconds'], 1e-9):11.1f}/s {r['units']:>9,} {r['unit']:<10} "
            f"{wall_ratio:6.2f} {cpu_ratio:6.2f} {r['rss'] / GIB:7.2f} G {r['anon'] / GIB:5.2f} G "
            f"{r['written'] / 2**20:8.1f} M {r['written'] / r['units']:8.0f} {r['cache'] / 2**20:7.1f} M"
        )
    largest = max(r["n"] for r in rows)
    top = max((r for r in rows if r["n"] == largest), key=lambda r: r["rss"])
    worst_text = f"{worst[0]:.2f} ({worst[1]})" if worst[1] else "n/a (one N)"
    lines.append(
        f"worst per-item ratio: {worst_text}; peak RSS: {top['rss'] / GIB:.2f} GiB ({top['stage']} at N={largest:,})"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(Path(argv[1]), argv[2])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--items",
        type=int,
        nargs="+",
        default=[1000, 5000, 31014],
        help="dataset sizes N, in images (default: 1,000 5,000 31,014)",
    )
    parser.add_argument("--epochs", type=int, default=1, help="training epochs per method (default 1)")
    parser.add_argument("--methods", nargs="+", default=["baseline", "cl2cm", "leccr"])
    parser.add_argument("--work", type=Path, default=None, help="work here and keep it (default: a temp folder)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of every stage (default: torch's, one per core; training: the "
        "preset's train.threads). On a machine others load, 1 avoids OpenMP teams waiting "
        "for descheduled partners (2 threads ran a training 2.7x slower than 1 there)",
    )
    parser.add_argument(
        "--ratio-of",
        choices=["wall", "cpu"],
        default="wall",
        help="what the last line's worst ratio compares: wall seconds (default) or CPU seconds per "
        "unit (steadier on a machine others load)",
    )
    parser.add_argument(
        "--rerun",
        nargs="+",
        type=rerun_label,
        default=None,
        help="with --work of an earlier run: run only these stages (or train[METHOD]) again (this code), at "
        "each N, on the artifacts that run left; the table goes to bench_scale_rerun.json",
    )
    parser.add_argument(
        "--report",
        type=Path,
        nargs="+",
        default=None,
        help="print the table of earlier runs' bench_scale.json (and bench_scale_rerun.json) files and stop; "
        "a later file's row replaces an earlier one's of the same N and stage",
    )
    args = parser.parse_args(argv)
    cost = "seconds" if args.ratio_of == "wall" else "cpu"
    if args.report is not None:
        merged: dict[tuple[int, str], dict] = {}
        for path in args.report:
            merged.update({(row["n"], row["stage"]): row for row in json.loads(path.read_text())})
        print(report(list(merged.values()), cost))
        return 0

    if args.rerun is not None:
        if args.work is None:
            parser.error("--rerun needs --work: the folder of the earlier run")
        rows: list[dict] = []
        for n_items in sorted(args.items):
            print(f"N = {n_items:,} (rerun of {', '.join(args.rerun)})", flush=True)
            rows += run_n(
                args.work,
                Path(),
                n_items,
                args.epochs,
                args.methods,
                args.threads,
                args.rerun,
                keep=lambda done, earlier=list(rows): keep_rows(args.work / "bench_scale_rerun.json", earlier + done),
            )
        print(report(rows, cost))
        return 0
    from leccr.cli.demo import prepare_demo

    work = args.work or Path(tempfile.mkdtemp(prefix="leccr-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    demo = prepare_demo(work / "demo")  # the tiny models (their tokenizers learn the demo's words)
    models = Path(demo["data"]).parent / "models"
    print(
        f"bench_scale: N = {', '.join(f'{n:,}' for n in args.items)}; {args.epochs} epoch(s) per method; "
        f"torch threads {args.threads or 'default'}; work folder {work}",
        flush=True,
    )
    rows = []
    for n_items in sorted(args.items):
        print(f"N = {n_items:,}", flush=True)
        rows += run_n(
            work,
            models,
            n_items,
            args.epochs,
            args.methods,
            args.threads,
            keep=lambda done, earlier=list(rows): keep_rows(work / "bench_scale.json", earlier + done),
        )
    print(f"\nwhole benchmark: {time.perf_counter() - started:.0f} s\n")
    print(report(rows, cost))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
