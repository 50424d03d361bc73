"""The content-addressed artifact store.

Each stage output lives in `<root>/<stage>/<key>/`, where `key` hashes what produced it (`KeyParts`):
the stage name, its code identity (`leccr.codeid`), its config section as the stage really uses it
(fields that cannot change the output left out, files and folders by content), and the content digest
of every upstream artifact — Hugging Face `datasets` fingerprints and DVC's stage lock in one. A
complete `_manifest.json`, written last, marks a finished artifact and records every part of its key
and the digest of what it holds: a later run with the same key does no work, and a run that differs
can say why.

Long stages write `part-NNNNN.parquet` shards through a temporary name and a rename, so a crash
loses at most the shard in progress and a rerun skips the committed ones.
"""
from __future__ import annotations

import contextlib
import fcntl
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
from leccr.fingerprint import Fingerprinter, hash_file
from leccr.progress import progress
from schemas.core import SCHEMA_VERSION, read_table, write_table
from schemas.errors import ERRORS

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
LOCK_FILE = ".lock"  # held (shared) by a running stage, so `leccr gc` leaves the folder alone
KEY_LENGTH = 16  # hex digits of sha256 kept in folder names
# The layout of artifact folders (shard names, manifest fields). Part of every key: bump it when the
# store writes results differently, since leccr.store itself is not part of any stage's code identity.
STORE_FORMAT = "2"


class StageFailed(RuntimeError):
    """A stage could not finish; the message says why and what a rerun will do."""


# ------------------------------------------------------------------------------------- keys
def resolve_section(section: BaseModel, fingerprints: Fingerprinter) -> dict[str, Any]:
    """A section as its stage really uses it, as plain JSON data.

    Left out: `NON_OUTPUT_FIELDS` (batch sizes, devices, thresholds) and the fields the section's
    current choices leave unused (`Section.unused_fields`: the other engine's settings). Content
    paths become `{"content": <fingerprint>}`, so moving a model keeps the key and editing it does not.
    """

    def walk(model: BaseModel) -> dict[str, Any]:
        out: dict[str, Any] = {}
        skip = set(getattr(model, "NON_OUTPUT_FIELDS", frozenset()))
        if isinstance(model, Section):
            skip |= model.unused_fields()
        for name, info in type(model).model_fields.items():
            if name in skip:
                continue
            is_path = any(isinstance(meta, _PathMarker) for meta in info.metadata) or _mentions_path(info.annotation)
            out[name] = convert(getattr(model, name), is_path)
        return out

    def convert(value: Any, is_path: bool) -> Any:
        if isinstance(value, BaseModel):
            return walk(value)
        if isinstance(value, dict):
            return {str(k): convert(v, is_path) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(v, is_path) for v in value]
        if is_path and isinstance(value, str):
            return {"content": fingerprints.path(value)}
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


@dataclass(frozen=True)
class KeyParts:
    """Everything a stage output's key hashes; the manifest keeps each part, so a new key can say why."""

    stage: str
    code: str  # leccr.codeid.code_digest of the stage module
    config: dict[str, Any]  # the section as the stage uses it (resolve_section, plus stage extras)
    upstream: dict[str, str]  # upstream stage -> content digest of the artifact it read
    # {module: digest} behind `code`, kept in the manifest so a new key can name the changed modules
    code_modules: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def key(self) -> str:
        payload = canonical_json({"stage": self.stage, "store_format": STORE_FORMAT, "code": self.code,
                                  "config": self.config, "upstream": dict(sorted(self.upstream.items()))})
        return hashlib.sha256(payload.encode()).hexdigest()[:KEY_LENGTH]


def content_digest(folder: Path) -> str:
    """Digest of what an artifact holds: every file but the manifest (hidden files skipped)."""
    hasher = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = file.relative_to(folder)
        if relative.as_posix() == MANIFEST or any(part.startswith(".") for part in relative.parts):
            continue
        hasher.update(f"{relative.as_posix()}\0{hash_file(file)}\n".encode())
    return hasher.hexdigest()


# ------------------------------------------------------------------------------------- files
@contextlib.contextmanager
def stage_lock(folder: Path) -> Iterator[None]:
    """Hold a shared lock on `<folder>/.lock` while a stage writes into the folder.

    `leccr gc` takes the lock exclusively without waiting, so it never deletes a folder a running
    stage holds; several shard tasks of one stage share it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def exclusive(folder: Path) -> Iterator[bool]:
    """Try to take `<folder>/.lock` exclusively without waiting: yields False while a stage holds it."""
    with open(folder / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_locked(folder: Path) -> bool:
    """True when a running stage holds `<folder>/.lock` (see stage_lock)."""
    if not (folder / LOCK_FILE).is_file():
        return False
    with exclusive(folder) as free:
        return not free


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

    @property
    def content_digest(self) -> str:
        """Digest of what the finished artifact holds (recorded in its manifest when it was written)."""
        return self.manifest["content_digest"]


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
    key_parts: KeyParts | None = None  # what the key hashes (recorded in the manifest)
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

    def artifacts(self) -> list[Artifact]:
        """Every artifact folder of every stage under this root, complete or not (hidden ones skipped)."""
        found = []
        for stage_dir in sorted(p for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []:
            if stage_dir.name.startswith(".") or stage_dir.name == "runs":
                continue
            found.extend(Artifact(stage_dir.name, p.name, p) for p in sorted(stage_dir.iterdir())
                         if p.is_dir() and not p.name.startswith("."))
        return found


def write_manifest(ctx: StageContext, started: float) -> None:
    """Write `_manifest.json` last: its presence is what marks the artifact complete.

    It records every part of the key (code digest, the config as used, upstream keys and digests) and
    the content digest of what the folder now holds, which downstream keys are made from.
    """
    parts = ctx.key_parts
    files = {}
    for parquet in sorted(ctx.out_dir.rglob("*.parquet")):
        relative = parquet.relative_to(ctx.out_dir)
        if not any(part.startswith(".") for part in relative.parts):
            files[relative.as_posix()] = _num_rows(parquet)
    manifest = {
        "stage": ctx.stage,
        "key": ctx.key,
        "store_format": STORE_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "code_digest": parts.code if parts else None,
        "code_modules": parts.code_modules if parts else {},
        "config": ctx.section.model_dump(mode="json"),
        "key_config": parts.config if parts else None,
        "upstream": {name: artifact.key for name, artifact in sorted(ctx.inputs.items())},
        "upstream_digests": dict(sorted(parts.upstream.items())) if parts else {},
        "content_digest": content_digest(ctx.out_dir),
        "rows": files,
        "seconds": round(time.time() - started, 3),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "summary": ctx.summary,
    }
    atomic_write_text(ctx.out_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
