"""The content-addressed artifact store.

Each stage output lives in `<root>/<stage>/<key>/`, where `key` hashes what produced it: the stage
name, its `STAGE_VERSION`, its config section (less the fields that do not change output), the
content of any model or dataset folder the section names, and the keys of its upstream artifacts —
the idea behind Hugging Face `datasets` fingerprints. A complete `_manifest.json`, written last, marks
a finished artifact: a later run with the same key does no work.

Long stages write `part-NNNNN.parquet` shards through a temporary name and a rename, so a crash
loses at most the shard in progress and a rerun skips the committed ones.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_args, get_origin

import pyarrow as pa
from pydantic import BaseModel

from leccr.config import Section, _PathMarker
from leccr.progress import progress
from schemas.core import SCHEMA_VERSION, read_table, write_table
from schemas.errors import ERRORS

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
KEY_LENGTH = 16  # hex digits of sha256 kept in folder names
# Files bigger than this are fingerprinted by size plus their first and last MiB, not their full content.
FULL_HASH_LIMIT = 16 * 2**20
# Media files are fingerprinted by relative path and size: hashing 120k images per run is too slow,
# and a re-encoded file changes size.
MEDIA_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".mp4", ".avi", ".mkv", ".webm", ".mov"}
)


class StageFailed(RuntimeError):
    """A stage could not finish; the message says why and what a rerun will do."""


# ------------------------------------------------------------------------------------- hashing
def _file_digest(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        if size <= FULL_HASH_LIMIT:
            for block in iter(lambda: handle.read(2**20), b""):
                digest.update(block)
        else:
            digest.update(f"size={size}".encode())
            digest.update(handle.read(2**20))
            handle.seek(size - 2**20)
            digest.update(handle.read(2**20))
    return digest.hexdigest()


def fingerprint_path(path: str | Path) -> str:
    """Content fingerprint of a file or folder, independent of where it lies on disk.

    Folders: every file by relative path and content (media files by relative path and size).
    A missing path is an error: a key must never be computed from something that is not there.
    """
    path = Path(path)
    if path.is_file():
        return _file_digest(path)
    if not path.is_dir():
        raise FileNotFoundError(f"cannot fingerprint {path}: no such file or folder")
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path).as_posix()
        if any(part.startswith(".") for part in file.relative_to(path).parts):
            continue  # temp files, caches
        if file.suffix.lower() in MEDIA_SUFFIXES:
            entry = f"{relative}\0size={file.stat().st_size}"
        else:
            entry = f"{relative}\0{_file_digest(file)}"
        digest.update(entry.encode() + b"\n")
    return digest.hexdigest()


def _resolved(section: BaseModel) -> Any:
    """The section as plain JSON data, with content paths replaced by their content fingerprints."""

    def walk(model: BaseModel) -> dict[str, Any]:
        out: dict[str, Any] = {}
        exclude = getattr(model, "NON_OUTPUT_FIELDS", frozenset())
        for name, info in type(model).model_fields.items():
            if name in exclude:
                continue
            value = getattr(model, name)
            is_path = any(isinstance(meta, _PathMarker) for meta in info.metadata) or _mentions_path(info.annotation)
            out[name] = convert(value, is_path)
        return out

    def convert(value: Any, is_path: bool) -> Any:
        if isinstance(value, BaseModel):
            return walk(value)
        if isinstance(value, dict):
            return {str(k): convert(v, is_path) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(v, is_path) for v in value]
        if is_path and isinstance(value, str):
            return {"content": fingerprint_path(value)}
        if value is None or isinstance(value, (str, int, float, bool)):
            return value
        raise TypeError(f"cannot hash config value {value!r} of type {type(value).__name__}")

    return walk(section)


def _mentions_path(annotation: Any) -> bool:
    """True when a type is ContentPath or holds it (Optional[ContentPath], dict[str, ContentPath], ...)."""
    if get_origin(annotation) is Annotated and any(isinstance(m, _PathMarker) for m in annotation.__metadata__):
        return True
    return any(_mentions_path(arg) for arg in get_args(annotation))


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def compute_key(stage: str, version: str, section: BaseModel, upstream: dict[str, str]) -> str:
    """The cache key of a stage output: sha256 of stage@version, the resolved section and upstream keys."""
    payload = canonical_json(
        {"stage": f"{stage}@{version}", "config": _resolved(section), "upstream": dict(sorted(upstream.items()))}
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:KEY_LENGTH]


# ------------------------------------------------------------------------------------- files
def atomic_write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def _read_umask() -> int:
    umask = os.umask(0o022)  # Python 3.11 can only read the umask by setting it
    os.umask(umask)
    return umask


# Read once at import (setting the umask, even back, races with threads creating files).
_UMASK = _read_umask()


def give_default_mode(path: Path) -> Path:
    """Set a file's permissions to what `open()` would have given it (0644 under the usual umask 022).

    safetensors (0.8) writes its files 0600, so a model saved for others to load was readable by its
    owner only."""
    os.chmod(path, 0o666 & ~_UMASK)
    return path


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


@dataclass(frozen=True)
class Artifact:
    """A small handle to a finished (or in-progress) stage output; what tasks pass to each other."""

    stage: str
    key: str
    path: Path

    def file(self, name: str) -> Path:
        return self.path / name

    def parts(self, subdir: str = "") -> list[Path]:
        """The committed shards of this artifact (or of one of its sub-tables), in order."""
        return sorted((self.path / subdir).glob("part-*.parquet"))

    def read(self, schema: pa.Schema, subdir: str = "", columns: list[str] | None = None) -> pa.Table:
        return read_table(self.parts(subdir), schema, columns)

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.path / MANIFEST).read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------- shards
T = TypeVar("T")


@dataclass
class ShardResult:
    """What one shard's processing produced: the rows to commit and the items that failed."""

    table: pa.Table
    errors: list[tuple[str, str]] = field(default_factory=list)  # (item_id, reason)
    stats: dict[str, float] = field(default_factory=dict)  # summed into the stage summary (e.g. tokens)


@dataclass
class ShardTotals:
    items: int = 0
    rows: int = 0
    errors: int = 0
    shards_done: int = 0
    shards_resumed: int = 0
    stats: dict[str, float] = field(default_factory=dict)


def shard_plan(work: Sequence[T], shard_size: int) -> list[list[T]]:
    """Split `work` (already in a stable order) into consecutive shards of `shard_size` items."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [list(work[i : i + shard_size]) for i in range(0, len(work), shard_size)]


# ------------------------------------------------------------------------------------- stage context
@dataclass
class StageContext:
    """Everything a stage function may use: its section, its inputs, and where to write.

    Stages never see the whole experiment config: what shapes their output must be in their section
    (and so in their key).
    """

    stage: str
    key: str
    section: Section
    inputs: dict[str, Artifact]
    out_dir: Path
    log: logging.Logger
    summary: dict[str, Any] = field(default_factory=dict)  # stage-specific facts for the manifest and log
    # (slot, slots): this process computes only shards with index % slots == slot and finalises
    # nothing — the scale-out runner maps a stage's shards onto several tasks this way, then one
    # ordinary run (every shard already committed) merges errors and writes the manifest.
    shard_slot: tuple[int, int] | None = None

    def write(self, name: str, table: pa.Table, schema: pa.Schema, row_group_size: int | None = None) -> Path:
        """Write one whole (non-sharded) Parquet file of this artifact atomically."""
        return write_table(table, self.out_dir / name, schema, row_group_size)

    def run_shards(
        self,
        work: Sequence[T],
        shard_size: int,
        process: Callable[[list[T], int], ShardResult],
        schema: pa.Schema,
        item_id: Callable[[T], str],
        subdir: str = "",
        max_error_rate: float | None = None,
        unit: str = "items",
        row_group_size: int | None = None,
    ) -> ShardTotals:
        """Process `work` shard by shard, committing each as `part-NNNNN.parquet`; resume-safe.

        A committed shard (its part file exists) is skipped, so a rerun after a crash or kill does
        only the missing shards. Each shard's failed items are written (atomically, before the part
        file) to `_errors/part-NNNNN.parquet`, and merged into `errors.parquet` at the end. Past
        `max_error_rate` the stage fails, keeping every committed shard.
        """
        folder = self.out_dir / subdir
        plan = shard_plan(work, shard_size)
        totals = ShardTotals(items=len(work))
        label = f"{self.stage}{'/' + subdir if subdir else ''}"
        with progress(total=len(work), desc=label, unit=unit, logger=self.log) as bar:
            for index, shard in enumerate(plan):
                part = folder / part_name(index)
                if self.shard_slot is not None and index % self.shard_slot[1] != self.shard_slot[0]:
                    bar.update(len(shard))
                    continue
                if part.exists():
                    totals.shards_resumed += 1
                    bar.update(len(shard))
                    continue
                started = time.perf_counter()
                result = process(shard, index)
                errors = pa.Table.from_pylist(
                    [{"item_id": str(item), "stage": self.stage, "shard": index, "reason": reason}
                     for item, reason in result.errors],
                    schema=ERRORS,
                )
                write_table(errors, folder / "_errors" / part_name(index), ERRORS)
                write_table(result.table, part, schema, row_group_size)
                for name, value in result.stats.items():
                    totals.stats[name] = totals.stats.get(name, 0.0) + value
                totals.shards_done += 1
                if "tokens" in totals.stats:
                    bar.set_postfix(f"{totals.stats['tokens'] / (time.perf_counter() - bar.started):.0f} tokens/s")
                bar.update(len(shard))
                self.log.debug("%s: shard %d committed (%d rows, %.2fs)", label, index,
                               result.table.num_rows, time.perf_counter() - started)
        if self.shard_slot is not None:
            return totals
        committed = sorted(folder.glob("part-*.parquet"))
        totals.rows = sum(_num_rows(p) for p in committed)
        error_parts = sorted((folder / "_errors").glob("part-*.parquet"))
        all_errors = read_table(error_parts, ERRORS) if error_parts else ERRORS.empty_table()
        totals.errors = all_errors.num_rows
        write_table(all_errors, folder / "errors.parquet", ERRORS)
        if max_error_rate is not None and work and totals.errors / len(work) > max_error_rate:
            reasons = all_errors.column("reason").to_pylist()[:3]
            raise StageFailed(
                f"{label}: {totals.errors} of {len(work)} {unit} failed "
                f"({totals.errors / len(work):.1%} > max_error_rate {max_error_rate:.1%}); "
                f"first reasons: {reasons}; all in {folder / 'errors.parquet'}. "
                f"{len(committed)} finished shard(s) are kept: fix the input or raise max_error_rate, "
                "and a rerun resumes from them."
            )
        return totals


def _num_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


# ------------------------------------------------------------------------------------- the store
class Store:
    """Artifacts under one root folder: `<root>/<stage>/<key>/`."""

    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()

    def artifact(self, stage: str, key: str) -> Artifact:
        return Artifact(stage, key, self.root / stage / key)

    def is_complete(self, artifact: Artifact) -> bool:
        return (artifact.path / MANIFEST).is_file()

    def latest(self, stage: str) -> Artifact | None:
        """The artifact a stage produced (or reused) most recently in this store."""
        pointer = self.root / stage / "LATEST"
        if not pointer.is_file():
            return None
        artifact = self.artifact(stage, pointer.read_text(encoding="utf-8").strip())
        return artifact if self.is_complete(artifact) else None

    def mark_latest(self, artifact: Artifact) -> None:
        atomic_write_text(self.root / artifact.stage / "LATEST", artifact.key + "\n")

    def discard(self, artifact: Artifact) -> None:
        """Remove an artifact folder (for --force): renamed away first so no reader sees it half-deleted."""
        if artifact.path.exists():
            trash = artifact.path.with_name(f".trash-{artifact.key}-{os.getpid()}-{time.time_ns()}")
            os.replace(artifact.path, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def iter_artifacts(self, stage: str) -> Iterator[Artifact]:
        folder = self.root / stage
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                if path.is_dir() and not path.name.startswith(".") and (path / MANIFEST).is_file():
                    yield Artifact(stage, path.name, path)


def write_manifest(ctx: StageContext, version: str, started: float, extra: dict[str, Any]) -> None:
    """Write `_manifest.json` last: its presence is what marks the artifact complete."""
    files = {}
    for parquet in sorted(ctx.out_dir.rglob("*.parquet")):
        relative = parquet.relative_to(ctx.out_dir)
        if not any(part.startswith(".") for part in relative.parts):
            files[relative.as_posix()] = _num_rows(parquet)
    manifest = {
        "stage": ctx.stage,
        "key": ctx.key,
        "stage_version": version,
        "schema_version": SCHEMA_VERSION,
        "config": ctx.section.model_dump(mode="json"),
        "key_config": _resolved(ctx.section),
        "upstream": {name: artifact.key for name, artifact in sorted(ctx.inputs.items())},
        "rows": files,
        "seconds": round(time.time() - started, 3),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "summary": ctx.summary,
        **extra,
    }
    atomic_write_text(ctx.out_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
