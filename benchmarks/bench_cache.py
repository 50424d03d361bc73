"""What a cached rerun costs: fingerprints (warm and cold) and the whole no-op `leccr run`.

    .venv/bin/python benchmarks/bench_cache.py [--files 100000] [--big-mb 1024] [--demo]

1. Warm fingerprint of a folder of `--files` small files (every digest in the persistent cache, as on
   a rerun): seconds, beside the cold pass that hashed them, and the bytes reread (0 when warm).
2. Cold hashing speed: BLAKE3 (leccr.core.fingerprint.hash_file) in MB/s beside `sha256sum` on the same
   files, both from the page cache (each file read once before timing).
3. Verifying a warm hit (leccr.core.artifact.damaged_files: a stat per file, the digest cache for the
   content) of an artifact of `--files` files, beside the warm fingerprint of the same folder that a
   rerun's key already pays: what serving only undamaged artifacts adds to a no-op rerun.
4. Verifying that hit again after its files were hard-linked into another folder (as the features
   stage links the visual shards: a link moves each file's ctime): bytes reread (0: the cache knows
   each file by device and inode too) and seconds.
5. `--demo`: the demo pipeline in a fresh artifact root, first run vs a second, fully cached run of
   the same command (both as subprocesses, wall time): the no-op ratio.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from leccr.core.fingerprint import Fingerprinter, hash_file  # noqa: E402


def small_files(folder: Path, count: int) -> None:
    past = time.time() - 3600  # an existing dataset: older than the racy window
    for index in range(count):
        sub = folder / f"{index // 1000:03d}"
        if index % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"{index:06d}.jpg"
        path.write_bytes(os.urandom(64) + index.to_bytes(8, "little") * 100)
        os.utime(path, (past, past))


def bench_warm(root: Path, count: int) -> None:
    folder = root / "many"
    started = time.perf_counter()
    small_files(folder, count)
    print(f"[setup] {count} files written in {time.perf_counter() - started:.1f}s")
    cache = root / "digests.sqlite"
    cold = Fingerprinter(cache)
    started = time.perf_counter()
    digest = cold.path(folder)
    cold_s = time.perf_counter() - started
    warm = Fingerprinter(cache)
    started, cpu = time.perf_counter(), time.process_time()
    assert warm.path(folder) == digest
    warm_s, warm_cpu = time.perf_counter() - started, time.process_time() - cpu
    again_s = _time(lambda: warm.path(folder))
    print(f"fingerprint of {count} files: cold {cold_s:.2f}s ({cold.hashed_files} files hashed), "
          f"warm {warm_s:.2f}s wall, {warm_cpu:.2f}s CPU ({warm.hashed_bytes} bytes reread; goal <= 1 s), "
          f"same run again {again_s * 1000:.1f} ms (memoised); warm/cold {warm_s / cold_s:.2f}x")


def bench_verify(root: Path, count: int) -> None:
    from leccr.core.artifact import Manifest, damaged_files
    from leccr.core.fingerprint import files_under

    folder = root / "many"  # written by bench_warm: an existing artifact's files
    cache = root / "digests.sqlite"
    fingerprints = Fingerprinter(cache)
    entries = files_under(folder)
    manifest = Manifest(stage="s", key="k", store_format="4", schema_version=2, code_digest="c", content_digest="d",
                        file_sizes={e.relative: e.stat.st_size for e in entries},
                        file_hashes={e.relative: fingerprints.file(e.absolute) for e in entries})
    first_s = _time(lambda: damaged_files(folder, manifest, Fingerprinter(cache)))  # file by file, then remembered
    verify_s = _time(lambda: damaged_files(folder, manifest, Fingerprinter(cache)))  # every later rerun
    key_s = _time(lambda: Fingerprinter(cache).path(folder))
    print(f"verifying a hit of {count} files: first time {first_s:.2f}s (file by file), every rerun after "
          f"{verify_s:.2f}s, beside the warm fingerprint of the same folder {key_s:.2f}s: {verify_s / key_s:.2f}x")


def bench_linked(root: Path, count: int) -> None:
    from leccr.core.artifact import Manifest, damaged_files
    from leccr.core.fingerprint import RACY_SECONDS, files_under

    folder, linked = root / "many", root / "linked"
    cache = root / "digests.sqlite"
    entries = files_under(folder)
    fingerprints = Fingerprinter(cache)
    manifest = Manifest(stage="s", key="k", store_format="4", schema_version=2, code_digest="c", content_digest="d",
                        file_sizes={e.relative: e.stat.st_size for e in entries},
                        file_hashes={e.relative: fingerprints.file(e.absolute) for e in entries})
    time.sleep(max(0.0, RACY_SECONDS - (time.time() - max(e.stat.st_mtime for e in entries)) + 0.1))
    damaged_files(folder, manifest, Fingerprinter(cache))  # remembered intact, as after any hit
    linked.mkdir()
    for entry in entries:
        os.link(entry.absolute, linked / entry.relative.replace("/", "_"))
    Fingerprinter(cache).path(linked)  # the linking stage's manifest hashes its links
    after = Fingerprinter(cache)
    seconds = _time(lambda: damaged_files(folder, manifest, after))
    print(f"verifying that hit after its {count} files were hard-linked elsewhere: {after.hashed_bytes:,} bytes "
          f"reread ({after.hashed_files} files), {seconds:.2f}s")


def _time(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def bench_cold(root: Path, total_mb: int) -> None:
    folder = root / "big"
    folder.mkdir()
    files = []
    chunk = os.urandom(2**20)
    for index in range(4):
        path = folder / f"weights-{index}.safetensors"
        with path.open("wb") as handle:
            for _ in range(total_mb // 4):
                handle.write(chunk)
        files.append(path)
    size_mb = sum(p.stat().st_size for p in files) / 2**20
    for path in files:  # both contenders read from the page cache
        hash_file(path)
    blake = _time(lambda: [hash_file(p) for p in files])
    sha = _time(lambda: subprocess.run(["sha256sum", *map(str, files)], check=True, capture_output=True))
    print(f"cold hashing of {size_mb:.0f} MB (page cache): blake3 {size_mb / blake:.0f} MB/s, "
          f"sha256sum {size_mb / sha:.0f} MB/s: {sha / blake:.2f}x sha256sum's speed")


def bench_demo(root: Path) -> None:
    from leccr.cli.demo import prepare_demo

    demo = root / "demo"
    prepare_demo(demo)
    config = root / "demo.yaml"
    text = (REPO / "configs" / "demo.yaml").read_text().replace("artifacts/demo/", f"{demo.as_posix()}/")
    config.write_text(text + f"\nartifacts_root: {(root / 'artifacts').as_posix()}\n")
    command = [sys.executable, "-m", "leccr.cli", "run", "--config", str(config)]
    first = _time(lambda: subprocess.run(command, cwd=REPO, check=True, capture_output=True))
    second_run = {}
    second = _time(lambda: second_run.setdefault("p", subprocess.run(command, cwd=REPO, check=True,
                                                                      capture_output=True, text=True)))
    assert "up to date" in second_run["p"].stdout, second_run["p"].stdout
    print(f"demo `leccr run`: first {first:.1f}s, cached rerun {second:.1f}s: "
          f"{second / first:.3f}x of the first run (goal < 0.10)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--big-mb", type=int, default=1024)
    parser.add_argument("--demo", action="store_true", help="also time the demo's first and cached runs")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    try:
        bench_warm(root, args.files)
        bench_verify(root, args.files)
        bench_linked(root, args.files)
        bench_cold(root, args.big_mb)
        if args.demo:
            bench_demo(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
