"""The content-addressed artifact store.

Each stage output lives in `<root>/<stage>/<key>/`, where `key` hashes what produced it (`KeyParts`):
the stage name, its code identity (`leccr.codeid`), its config section as the stage really uses it
(fields that cannot change the output left out, files and folders by content), and the content digest
of every upstream artifact — Hugging Face `datasets` fingerprints and DVC's stage lock in one. A
complete `_manifest.json`, written last, marks a finished artifact and records every part of its key
and the digest of what it holds: a later run with the same key does no work, and a run that differs
can say why.

Long stages write `part-NNNNN.parquet` shards through a temporary name, an fsync and a rename, so a
crash loses at most the shard in progress and a rerun skips the committed ones. A worker claims a
shard before computing it (`_claims/`), so two runs on one root never compute the same shard twice.
A rerun retries the items whose error is retryable (missing or unreadable file, engine error).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Annotated, Any, NamedTuple, TypeVar, get_args, get_origin

import pyarrow as pa
from pydantic import BaseModel

from leccr.config import Section, _PathMarker
from leccr.fingerprint import Fingerprinter, files_under, hash_file
from leccr.progress import progress
from schemas.core import SCHEMA_VERSION, durable_replace, read_table, validate, volatile_columns, write_table
from schemas.errors import ERRORS

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
LOCK_FILE = ".lock"  # held (shared) by a running stage, so `leccr gc` leaves the folder alone
KEY_LENGTH = 16  # hex digits of sha256 kept in folder names
# The layout of artifact folders (shard names, manifest fields). Part of every key: bump it when the
# store writes results differently, since leccr.store itself is not part of any stage's code identity.
STORE_FORMAT = "3"  # 3: errors rows gained file, line, retryable, file_state


class StageFailed(RuntimeError):
    """A stage could not finish; the message says why and what a rerun will do."""


# ------------------------------------------------------------------------------------- keys
def resolve_section(section: BaseModel, fingerprints: Fingerprinter) -> dict[str, Any]:
    """A section as its stage really uses it, as plain JSON data.

    Left out: `NON_OUTPUT_FIELDS` (batch sizes, devices, thresholds) and the fields the section's
    current choices leave unused (`Section.unused_fields`: the other engine's settings). Content
    paths become `{"content": <fingerprint>}`, so moving a model keeps the key and editing it does not;
    a Hugging Face hub id (`org/name[@rev]`, no such local path) is its cached snapshot's content plus
    `{"hub": repo, revision, commit}`.
    """

    def walk(model: BaseModel, where: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        skip = set(getattr(model, "NON_OUTPUT_FIELDS", frozenset()))
        if isinstance(model, Section):
            skip |= model.unused_fields()
        for name, info in type(model).model_fields.items():
            if name in skip:
                continue
            is_path = any(isinstance(meta, _PathMarker) for meta in info.metadata) or _mentions_path(info.annotation)
            out[name] = convert(getattr(model, name), is_path, f"{where}{name}")
        return out

    def convert(value: Any, is_path: bool, where: str) -> Any:
        if isinstance(value, BaseModel):
            return walk(value, where + ".")
        if isinstance(value, dict):
            return {str(k): convert(v, is_path, f"{where}.{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(v, is_path, where) for v in value]
        if is_path and isinstance(value, str):
            return path_identity(value, fingerprints, where)
        if value is None or isinstance(value, (str, int, float, bool)):
            return value
        raise TypeError(f"cannot hash config value {value!r} of type {type(value).__name__}")

    return walk(section, "")


def path_identity(value: str, fingerprints: Fingerprinter, where: str = "") -> dict[str, Any]:
    """What a content path holds: a local file or folder by content, or a hub id's cached snapshot."""
    from leccr.hub import parse_hub_id, resolve_model

    if Path(value).expanduser().exists() or parse_hub_id(value) is None:
        try:
            return {"content": fingerprints.path(Path(value).expanduser())}
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{where}: {error}" if where else str(error)) from None
    try:
        resolved = resolve_model(value)  # ModelNotFound says how to get it
    except FileNotFoundError as error:
        raise type(error)(f"{where}: {error}" if where else str(error)) from None
    return {"content": fingerprints.path(resolved.path), "hub": resolved.identity}


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


def file_digests(folder: Path) -> dict[str, str]:
    """{relative path: digest} of what an artifact holds: every file but the manifest (hidden files
    skipped). A Parquet file with volatile columns (schemas.core.VOLATILE: timings, file states) counts
    by its other columns only, so recomputing the same output gives the same digests."""
    return {entry.relative: _stable_digest(Path(entry.absolute))
            for entry in files_under(folder) if entry.relative != MANIFEST}


def combined_digest(digests: dict[str, str]) -> str:
    """One digest of some of an artifact's files (all of them: its content digest)."""
    hasher = hashlib.sha256()
    for relative, digest in digests.items():
        hasher.update(f"{relative}\0{digest}\n".encode())
    return hasher.hexdigest()


def content_digest(folder: Path) -> str:
    """Digest of everything an artifact holds (see `file_digests`)."""
    return combined_digest(file_digests(folder))


def _stable_digest(file: Path) -> str:
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        volatile = volatile_columns(pq.read_schema(file))
        if volatile:
            table = pq.read_table(file).drop_columns(volatile)
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()
    return hash_file(file)


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
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write through a temporary name, fsync, rename, fsync the folder: all or nothing, even on power loss."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # The thread too: stage tasks of one process (a sweep's variants) write the same LATEST pointer at once.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_bytes(data)
    durable_replace(tmp, path)
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

    def digest_of(self, names: tuple[str, ...]) -> str:
        """Digest of these files of the finished artifact only, from the digests its manifest recorded
        (computed from the files for a manifest older than that record)."""
        recorded = self.manifest.get("file_digests") or file_digests(self.path)
        missing = [name for name in names if name not in recorded]
        if missing:
            raise FileNotFoundError(f"{self.path} holds no {missing}")
        return combined_digest({name: recorded[name] for name in sorted(names)})


# ------------------------------------------------------------------------------------- shards
T = TypeVar("T")


class ItemError(NamedTuple):
    """One failed item of a shard. A plain `(item_id, reason)` tuple is a final (non-retryable) error."""

    item_id: str
    reason: str
    # True when the failure may go away without a new input: a missing or unreadable media file (a
    # mount that was down, a file being copied), an engine error. A rerun retries these items only.
    retryable: bool = False
    # The media file at fault, as items.parquet stores it (relative to the dataset root): a finished
    # artifact is reopened for a retry when this file has changed since the failure.
    file: str | None = None


@dataclass
class ShardResult:
    """What one shard's processing produced: the rows to commit and the items that failed."""

    table: pa.Table
    errors: list[ItemError | tuple[str, str]] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)  # summed into the stage summary (e.g. tokens)


@dataclass
class ShardTotals:
    items: int = 0
    rows: int = 0  # committed output rows (error rows are not output)
    errors: int = 0
    retryable_errors: int = 0  # of `errors`: the ones a rerun retries
    shards_done: int = 0
    shards_resumed: int = 0  # committed by an earlier (or concurrent) run and kept as they were
    shards_recomputed: int = 0  # of `shards_done`: committed but empty or unreadable, computed again
    items_retried: int = 0  # failed items of committed shards computed again
    stats: dict[str, float] = field(default_factory=dict)


def shard_plan(work: Sequence[T], shard_size: int) -> list[list[T]]:
    """Split `work` (already in a stable order) into consecutive shards of `shard_size` items."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [list(work[i : i + shard_size]) for i in range(0, len(work), shard_size)]


def _error_table(errors: list[ItemError | tuple[str, str]], stage: str, index: int,
                 dataset_root: Path | None = None) -> pa.Table:
    rows = [ItemError(*error) for error in errors]
    return pa.Table.from_pylist(
        [{"item_id": str(e.item_id), "stage": stage, "shard": index, "reason": e.reason, "file": e.file,
          "line": None, "retryable": bool(e.retryable),
          "file_state": None if e.file is None else file_state(dataset_root, e.file)} for e in rows],
        schema=ERRORS,
    )


def file_state(dataset_root: Path | None, stored: str) -> str:
    """A media file's state as an error row records it: size, mtime and inode, or "missing"."""
    from leccr.datasets.base import resolve_media_path

    try:
        stat = os.stat(resolve_media_path(dataset_root, stored))
    except OSError:
        return "missing"
    return f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}"


def _due(row: dict[str, Any], dataset_root: Path | None, need_file: bool) -> bool:
    """Whether a rerun retries this error row: retryable, and its file changed since the failure (an
    error without a file, an engine error, is retried by the rerun of an unfinished stage only)."""
    if not row["retryable"]:
        return False
    if row["file"] is None:
        return not need_file
    return file_state(dataset_root, row["file"]) != row["file_state"]


def _unreadable(path: Path) -> str | None:
    """Why a committed Parquet file cannot be used (empty, cut, not Parquet), or None when it is fine."""
    import pyarrow.parquet as pq

    try:
        if path.stat().st_size == 0:
            return "the file is empty (0 bytes)"
        pq.ParquetFile(path).metadata  # the footer: a cut or overwritten file fails here
    except (OSError, pa.ArrowException) as error:
        return f"{type(error).__name__}: {error}"
    return None


class ShardClaims:
    """One claim file per shard, so concurrent runs on one artifact root never compute a shard twice.

    A claim is created with O_CREAT|O_EXCL (atomic on local filesystems and NFSv3+) and holds the
    claimant's host, pid and process start time. A claim whose process is gone (same host: the pid is
    dead or now belongs to another process; another host: older than `STALE_SECONDS`) is taken over.
    The img2dataset writers do the same per shard.
    """

    STALE_SECONDS = 3600.0  # a claim from another host is trusted this long (no liveness check there)

    def __init__(self, folder: Path):
        self.folder = folder / "_claims"
        self.held: set[int] = set()

    def _path(self, index: int) -> Path:
        return self.folder / f"part-{index:05d}.claim"

    def acquire(self, index: int) -> bool:
        """Claim shard `index`; False when another live worker holds it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(index)
        for _ in range(2):  # once more after removing a stale claim
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self.holder_alive(index):
                    return False
                path.unlink(missing_ok=True)  # stale: its worker died (kill -9, power cut)
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(_me(), handle)
            self.held.add(index)
            return True
        return False

    def holder_alive(self, index: int) -> bool:
        path = self._path(index)
        try:
            holder = json.loads(path.read_text(encoding="utf-8"))
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return False
        except (OSError, ValueError):
            return time.time() - path.stat().st_mtime < 5  # being written right now, or garbage
        if holder.get("host") != socket.gethostname():
            return age < self.STALE_SECONDS
        return _process_alive(int(holder.get("pid", -1)), holder.get("started"))

    def release(self, index: int) -> None:
        if index in self.held:
            self._path(index).unlink(missing_ok=True)
            self.held.discard(index)

    def release_all(self) -> None:
        for index in list(self.held):
            self.release(index)
        try:
            self.folder.rmdir()  # only when no other worker still holds a claim
        except OSError:
            pass


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from the claimant."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _me() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(os.getpid())}


def _process_alive(pid: int, started: str | None) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    return started is None or _process_start(pid) in (None, started)


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
    # The configured `dataset.path`: media paths in items.parquet are relative to it (see
    # `leccr.datasets.resolve_media_path`), so a moved dataset folder keeps its cache and works.
    dataset_root: Path | None = None

    def write(self, name: str, table: pa.Table, schema: pa.Schema, row_group_size: int | None = None) -> Path:
        """Write one whole (non-sharded) Parquet file of this artifact atomically."""
        return write_table(table, self.out_dir / name, schema, row_group_size)

    def media_path(self, stored: str | None) -> str | None:
        """An item's `path` or `feature_path` from items.parquet, as a file to open now."""
        from leccr.datasets.base import resolve_media_path

        return resolve_media_path(self.dataset_root, stored)

    def next_shard(self, n_shards: int) -> Callable[[int], int | None]:
        """`next_shard(n)(index)`: the shard this process computes after `index` (its own slot's,
        skipping committed ones), or None: the one a prefetcher should decode next."""
        step = self.shard_slot[1] if self.shard_slot is not None else 1

        def after(index: int) -> int | None:
            candidate = index + step
            while candidate < n_shards and (self.out_dir / part_name(candidate)).exists():
                candidate += step
            return candidate if candidate < n_shards else None

        return after

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
        key_column: str = "item_id",
        units_per_item: int = 1,
        error_unit: str | None = None,
        background_write: bool = False,
    ) -> ShardTotals:
        """Process `work` shard by shard, committing each as `part-NNNNN.parquet`; resume-safe.

        A committed shard (its part file exists and is readable) is kept, so a rerun after a crash or
        kill does only the missing shards; an empty or unreadable one is named in a warning and
        computed again. A committed shard whose `_errors/part-NNNNN.parquet` holds retryable failures
        that are due (the media file changed since it failed; no file: an engine error) is computed
        again for those items only (`process` gets that subset; rows are matched to work
        items by `key_column` == `item_id(item)`); its good rows are kept. Each shard's failed items
        are written (atomically, before the part file) to `_errors/part-NNNNN.parquet`, and merged into
        `errors.parquet` at the end. The error rate counts `units_per_item` units of work per item
        (caption x language for translate); past `max_error_rate` the stage fails, keeping every
        committed shard. Each shard is claimed first (`ShardClaims`): a shard another live worker is
        computing is waited for, not computed twice.

        `background_write`: shard N is committed on a writer thread while shard N+1 is processed
        (`ShardWriter`: one commit at a time, a failed commit raised here; the shard's claim is held
        until its commit is done); the commit itself is the same, so resume and the error files
        behave as without it.
        """
        folder = self.out_dir / subdir
        plan = shard_plan(work, shard_size)
        totals = ShardTotals(items=len(work))
        label = f"{self.stage}{'/' + subdir if subdir else ''}"
        claims = ShardClaims(folder)
        writer = ShardWriter() if background_write else None
        mine = [i for i in range(len(plan)) if self.shard_slot is None or i % self.shard_slot[1] == self.shard_slot[0]]
        try:
            with progress(total=len(work), desc=label, unit=unit, logger=self.log) as bar, _closing(writer):
                bar.skip(len(work) - sum(len(plan[i]) for i in mine))  # other slots' shards
                waiting = self._shard_pass(mine, plan, folder, process, schema, item_id, key_column,
                                           row_group_size, claims, totals, bar, label, writer)
                while waiting:  # shards another worker is computing: wait for them, or take over if it dies
                    time.sleep(0.5)
                    waiting = self._shard_pass(waiting, plan, folder, process, schema, item_id, key_column,
                                               row_group_size, claims, totals, bar, label, writer)
        finally:
            claims.release_all()
        if totals.shards_resumed:
            self.log.info("%s: kept %d finished shard(s) of %d; computed %d%s", label, totals.shards_resumed,
                          len(plan), totals.shards_done,
                          f", retried {totals.items_retried} failed item(s)" if totals.items_retried else "")
        if self.shard_slot is not None:
            return totals
        committed = sorted(folder.glob("part-*.parquet"))
        totals.rows = sum(_num_rows(p) for p in committed)
        error_parts = sorted((folder / "_errors").glob("part-*.parquet"))
        all_errors = read_table(error_parts, ERRORS) if error_parts else ERRORS.empty_table()
        totals.errors = all_errors.num_rows
        totals.retryable_errors = sum(all_errors.column("retryable").to_pylist())
        write_table(all_errors, folder / "errors.parquet", ERRORS)
        units = len(work) * units_per_item
        what = error_unit or unit
        if max_error_rate is not None and units and totals.errors / units > max_error_rate:
            reasons = all_errors.column("reason").to_pylist()[:3]
            final = totals.errors - totals.retryable_errors
            advice = []
            if totals.retryable_errors:
                advice.append(f"a rerun retries the {totals.retryable_errors} retryable failure(s) (missing or "
                              "unreadable files, engine errors) and nothing else")
            if final:
                advice.append(f"{'the other ' if totals.retryable_errors else ''}{final} are final for this input: "
                              "a rerun does not retry them; a fixed "
                              f"input or a higher {self.stage.split('-')[0]}.max_error_rate lets the stage finish")
            raise StageFailed(
                f"{label}: {totals.errors} of {units} {what} failed "
                f"({totals.errors / units:.1%} > max_error_rate {max_error_rate:.1%}); "
                f"first reasons: {reasons}; all in {folder / 'errors.parquet'}. "
                f"{len(committed)} finished shard(s) are kept; " + "; ".join(advice) + "."
            )
        return totals

    def _shard_pass(self, indices: list[int], plan: list[list[T]], folder: Path,
                    process: Callable[[list[T], int], ShardResult], schema: pa.Schema,
                    item_id: Callable[[T], str], key_column: str, row_group_size: int | None,
                    claims: ShardClaims, totals: ShardTotals, bar: Any, label: str,
                    writer: ShardWriter | None = None) -> list[int]:
        """One pass over `indices`: compute, retry or keep each shard; returns those another worker holds."""
        busy = []
        for index in indices:
            handed_to_writer = False
            shard = plan[index]
            part, errors_part = folder / part_name(index), folder / "_errors" / part_name(index)
            retry: set[str] = set()
            if part.exists():
                problem = _unreadable(part) or (_unreadable(errors_part) if errors_part.exists() else None)
                if problem is None:
                    retry = _retryable_ids(errors_part, self.dataset_root) & {item_id(w) for w in shard}
                    if not retry:
                        totals.shards_resumed += 1
                        bar.skip(len(shard))
                        continue
            if not claims.acquire(index):
                busy.append(index)
                continue
            try:
                started = time.perf_counter()
                if part.exists() and retry and _unreadable(part) is None:  # another worker may have retried it
                    retry &= _retryable_ids(errors_part, self.dataset_root)
                    subset = [w for w in shard if item_id(w) in retry]
                    if subset:
                        self._retry_shard(subset, index, part, errors_part, process, schema, item_id,
                                          key_column, row_group_size, totals, shard)
                    else:
                        totals.shards_resumed += 1
                    bar.skip(len(shard) - len(subset))
                    bar.update(len(subset))
                    continue
                if part.exists():
                    problem = _unreadable(part) or (_unreadable(errors_part) if errors_part.exists() else None)
                    if problem is None:  # committed by another worker while we waited
                        totals.shards_resumed += 1
                        bar.skip(len(shard))
                        continue
                    self.log.warning("%s: committed shard %s is unusable (%s): computing it again",
                                     label, part, problem)
                    part.unlink()
                    totals.shards_recomputed += 1
                result = process(shard, index)
                commit = partial(_commit_shard, _error_table(result.errors, self.stage, index, self.dataset_root),
                                 errors_part, result.table, part, schema, row_group_size)
                if writer is None:
                    commit()
                else:
                    writer.submit(partial(_commit_then_release, commit, claims, index))
                    handed_to_writer = True
                _add_stats(totals, result)
                totals.shards_done += 1
                if "tokens" in totals.stats:
                    bar.set_postfix(f"{totals.stats['tokens'] / (time.perf_counter() - bar.started):.0f} tokens/s")
                bar.update(len(shard))
                self.log.debug("%s: shard %d committed (%d rows, %.2fs)", label, index,
                               result.table.num_rows, time.perf_counter() - started)
            finally:
                if not handed_to_writer:
                    claims.release(index)
        return busy

    def _retry_shard(self, subset: list[T], index: int, part: Path, errors_part: Path,
                     process: Callable[[list[T], int], ShardResult], schema: pa.Schema,
                     item_id: Callable[[T], str], key_column: str, row_group_size: int | None,
                     totals: ShardTotals, shard: list[T]) -> None:
        """Compute a committed shard's retryable failures again; keep its other rows and errors.

        The part file is rewritten first (old rows of the retried items dropped, so a crash between the
        two writes and another retry cannot duplicate rows), then the errors file.
        """
        import pyarrow.compute as pc

        retried = pa.array([item_id(w) for w in subset], pa.string())
        result = process(subset, index)
        table = validate(result.table, schema, f"retry of shard {index}")
        new_rows = table.filter(pc.is_in(table.column(key_column), retried))
        new_errors = _error_table(result.errors, self.stage, index, self.dataset_root)
        new_errors = new_errors.filter(pc.is_in(new_errors.column("item_id"), retried))
        old = read_table(part, schema)
        kept = old.filter(pc.invert(pc.is_in(old.column(key_column), retried)))
        position = {item_id(w): i for i, w in reversed(list(enumerate(shard)))}
        merged = pa.concat_tables([kept, new_rows])
        keys = merged.column(key_column).to_pylist()
        order = sorted(range(merged.num_rows), key=lambda i: position.get(keys[i], len(shard)))
        write_table(merged.take(pa.array(order, pa.int64())), part, schema, row_group_size)
        old_errors = read_table(errors_part, ERRORS)
        errors = pa.concat_tables([old_errors.filter(pc.invert(pc.is_in(old_errors.column("item_id"), retried))),
                                   new_errors])
        write_table(errors, errors_part, ERRORS)
        _add_stats(totals, result)
        totals.items_retried += len(subset)
        self.log.info("%s: retried %d failed item(s) of shard %d: %d now done", self.stage, len(subset), index,
                      len(subset) - len(set(new_errors.column("item_id").to_pylist())))


def _add_stats(totals: ShardTotals, result: ShardResult) -> None:
    for name, value in result.stats.items():
        totals.stats[name] = totals.stats.get(name, 0.0) + value


def _retryable_ids(errors_part: Path, dataset_root: Path | None) -> set[str]:
    if not errors_part.exists():
        return set()
    table = read_table(errors_part, ERRORS, columns=["item_id", "retryable", "file", "file_state"])
    return {row["item_id"] for row in table.to_pylist() if _due(row, dataset_root, need_file=False)}


def changed_failures(folder: Path, dataset_root: Path | None) -> int:
    """Retryable failures of a finished artifact whose media file changed (fixed, restored, mounted
    again) since the failure: those a rerun tries again. A file still as it was when it failed is not
    retried, so a finished stage with a broken file stays a cache hit."""
    count = 0
    for path in sorted(folder.rglob("errors.parquet")):
        if any(part.startswith(".") for part in path.relative_to(folder).parts) or _unreadable(path):
            continue
        rows = read_table(path, ERRORS, columns=["retryable", "file", "file_state"]).to_pylist()
        count += sum(_due(row, dataset_root, need_file=True) for row in rows)
    return count


def reopen_for_retry(folder: Path, dataset_root: Path | None, log: logging.Logger | logging.LoggerAdapter,
                     what: str) -> bool:
    """When files of a finished artifact's retryable failures have changed since, remove its manifest (so
    it is no longer a cache hit) and say so; the stage then runs again, keeps every committed shard and
    retries only its retryable failures. An unfinished artifact retries them anyway (see `run_shards`)."""
    if not (folder / MANIFEST).is_file():
        return False
    changed = changed_failures(folder, dataset_root)
    if not changed:
        return False
    log.info("%s: %d failed item(s) have a changed file since they failed: retrying the failed items of %s, "
             "keeping everything else", what, changed, folder)
    (folder / MANIFEST).unlink(missing_ok=True)
    return True


def _commit_shard(errors: pa.Table, errors_path: Path, table: pa.Table, part: Path, schema: pa.Schema,
                  row_group_size: int | None) -> None:
    """The error rows first, then the part file: a part file on disk means a complete shard."""
    write_table(errors, errors_path, ERRORS)
    write_table(table, part, schema, row_group_size)


def _commit_then_release(commit: Callable[[], None], claims: ShardClaims, index: int) -> None:
    try:
        commit()
    finally:
        claims.release(index)


class ShardWriter:
    """Runs shard commits on one background thread, so that writing shard N (Parquet encoding,
    which releases the GIL) overlaps computing shard N+1.

    At most `depth` commits are queued or running: `submit` first waits for the oldest beyond that
    (which bounds the shard tables held in memory) and re-raises its error in the caller's thread;
    `close` waits for the rest, so every submitted shard is committed (or its error raised) before
    the caller reads the folder.
    """

    def __init__(self, depth: int = 1):
        self.depth = depth
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._pending: deque[Future] = deque()

    def submit(self, commit: Callable[[], None]) -> None:
        while len(self._pending) >= self.depth:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(commit))

    def close(self) -> None:
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True)


@contextlib.contextmanager
def _closing(writer: ShardWriter | None) -> Iterator[None]:
    """Wait for the writer's commits on the way out, also when processing raised (a shard already
    handed to the writer is still committed, as it would have been without one)."""
    try:
        yield
    finally:
        if writer is not None:
            writer.close()


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
        """Every artifact folder of every stage under this root, complete or not: `<stage>/<key>` for
        the pipeline's stages only. Anything else kept under the root (the demo's data and models in
        `artifacts/demo/`, say) is no artifact."""
        from leccr.stage_order import declared_upstream

        found = []
        for stage in sorted(declared_upstream()):
            stage_dir = self.root / stage
            if stage_dir.is_dir():
                found.extend(Artifact(stage, p.name, p) for p in sorted(stage_dir.iterdir())
                             if p.is_dir() and _is_key(p.name))
        return found


def _is_key(name: str) -> bool:
    return len(name) == KEY_LENGTH and all(c in "0123456789abcdef" for c in name)


def write_manifest(ctx: StageContext, started: float) -> None:
    """Write `_manifest.json` last: its presence is what marks the artifact complete.

    It records every part of the key (code digest, the config as used, upstream keys and digests) and
    the content digest of what the folder now holds, which downstream keys are made from.
    """
    parts = ctx.key_parts  # the pipeline always gives the context its key's parts
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
        "code_digest": parts.code,
        "code_modules": parts.code_modules,
        "config": ctx.section.model_dump(mode="json"),
        "key_config": parts.config,
        "upstream": {name: artifact.key for name, artifact in sorted(ctx.inputs.items())},
        "upstream_digests": dict(sorted(parts.upstream.items())),
        "file_digests": (digests := file_digests(ctx.out_dir)),
        "content_digest": combined_digest(digests),
        "rows": files,
        "seconds": round(time.time() - started, 3),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "summary": ctx.summary,
    }
    atomic_write_text(ctx.out_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
