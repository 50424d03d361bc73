"""Content fingerprints of files and folders, each file hashed in full and, while unchanged, only once.

A cache key must change when any byte of a model, a dataset or an import file changes, so every file
is hashed whole — weights and media included (BLAKE3, several threads over a memory map). Rereading
a 20 GB dataset on every run would make a cached rerun slow, so digests are remembered in a small
SQLite table keyed by what `stat` says of the file: (absolute path, size, mtime_ns, inode, ctime_ns),
the way git's index and DVC's state database avoid rereading unchanged files. Writing a file changes
its mtime and ctime (even `head -c SIZE /dev/urandom > F`, which keeps the size), so the next lookup
misses and the file is hashed again.

Hard links: linking a file (the features stage links the visual shards) changes its ctime under every
name it has, so the entry of the old name no longer matches. A lookup that misses by path falls back to
an entry of any path with the same (device, inode, size, mtime_ns, ctime_ns): that is the same file
object, unchanged since it was hashed under its other name, so the next verification of the linked
artifact reads nothing.

A garbled cache (not a database, or a corrupt one) is named in the log, moved aside and made afresh:
it only saves time, so it is never a reason to fail, and never a reason to rehash on every run.

Racy entries: a file written within the same clock tick as its hashing could change again without a
visible mtime change. Like git, entries whose mtime is younger than `RACY_SECONDS` at hashing time are
used for this run but not stored.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import blake3

log = logging.getLogger(__name__)

DIGEST_CACHE = "digests.sqlite"  # in <artifacts root>/.cache/
RACY_SECONDS = 2.0
_SMALL_FILE = 1 << 20  # below this, a plain read beats setting up a memory map


def hash_file(path: str | Path) -> str:
    """BLAKE3 of a file's whole content (hex)."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    size = os.stat(path).st_size
    if size >= _SMALL_FILE:
        hasher.update_mmap(str(path))
    elif size:
        with open(path, "rb") as handle:
            hasher.update(handle.read())
    return hasher.hexdigest()


def _signature(stat: os.stat_result) -> tuple[int, int, int, int]:
    return stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns


def _identity(stat: os.stat_result) -> tuple[int, int, int, int, int]:
    """The file object and its state, whatever name it is reached by (a hard link shares all five)."""
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


@dataclass
class _Entry:
    relative: str
    absolute: str
    stat: os.stat_result


def files_under(folder: Path) -> list[_Entry]:
    """Every regular file under `folder` (hidden files and folders skipped: temp files, caches), sorted."""
    found: list[_Entry] = []
    pending = [(str(folder), "")]
    while pending:
        current, prefix = pending.pop()
        with os.scandir(current) as entries:
            for entry in entries:
                if entry.name[0] == ".":
                    continue
                if entry.is_dir():
                    pending.append((entry.path, prefix + entry.name + "/"))
                elif entry.is_file():
                    found.append(_Entry(prefix + entry.name, entry.path, entry.stat()))
    found.sort(key=lambda e: e.relative)
    return found


def stat_identity(path: str | Path) -> str:
    """What `stat` says of a file or of every file of a folder, as one digest: equal identities mean
    unchanged content (git's index rule), at the cost of a stat per file. A long-lived worker keys its
    loaded models by this, so a model rewritten in place under the same path is loaded again."""
    path = Path(path).absolute()
    if path.is_file():
        return _listing([_Entry(path.name, str(path), path.stat())])
    return _listing(files_under(path))


def listing_digest(entries: list[_Entry]) -> str:
    """Digest of what `stat` says of every file of a folder: equal listings mean unchanged files."""
    return _listing(entries)


def _listing(entries: list[_Entry]) -> str:
    """Digest of what `stat` says of every file of a folder: equal listings mean unchanged files."""
    return blake3.blake3(
        "".join(
            f"{e.relative}\0{e.stat.st_size}\0{e.stat.st_mtime_ns}\0{e.stat.st_ino}\0{e.stat.st_ctime_ns}\n"
            for e in entries
        ).encode()
    ).hexdigest()


class Fingerprinter:
    """Fingerprints of files and folders for one run, backed by a persistent digest cache.

    One instance per run: a path asked for twice is fingerprinted once (folders are memoised by path
    for the life of the instance, files by their stat signature). `cache_file=None` keeps digests in
    memory only.
    """

    def __init__(self, cache_file: str | Path | None = None):
        self.cache_file = Path(cache_file) if cache_file is not None else None
        self._files: dict[str, tuple[tuple[int, int, int, int], str]] = {}
        # (device, inode, size, mtime_ns, ctime_ns) -> digest of the files met this run: the same file
        # under another name (a hard link). Earlier runs' are looked up in the cache file when a path misses.
        self._inodes: dict[tuple[int, int, int, int, int], str] = {}
        self._folders: dict[str, str] = {}
        self._loaded = False
        self._schema_ready = False
        self._unusable_said = False
        self._lock = threading.Lock()
        self.hashed_bytes = 0  # bytes read this run (a warm rerun reads none)
        self.hashed_files = 0

    # ------------------------------------------------------------------ persistent cache
    def _connect(self) -> sqlite3.Connection | None:
        if self.cache_file is None:
            return None
        for attempt in range(2):
            con = None
            try:
                self.cache_file.parent.mkdir(parents=True, exist_ok=True)
                con = sqlite3.connect(self.cache_file, timeout=30)
                if not self._schema_ready:
                    _create_schema(con)
                    self._schema_ready = True
                return con
            except sqlite3.DatabaseError as error:
                if con is not None:
                    con.close()
                if attempt == 0 and self._set_aside_if_garbled(error):
                    continue  # a fresh cache in its place
                self._say_unusable(error)
                return None
            except OSError as error:
                self._say_unusable(error)  # a read-only or odd filesystem: hash without remembering
                return None
        return None

    def _say_unusable(self, error: BaseException) -> None:
        if not self._unusable_said:
            self._unusable_said = True
            log.warning(
                "digest cache %s cannot be used (%s): this run hashes files without remembering them",
                self.cache_file,
                error,
            )

    def _set_aside_if_garbled(self, error: sqlite3.DatabaseError) -> bool:
        """Move a garbled cache file (and its WAL) aside and say so; True when it was garbled."""
        if getattr(error, "sqlite_errorcode", None) not in _GARBLED or self.cache_file is None:
            return False
        # Another process may already have replaced it with a fresh cache: only a file still garbled goes.
        problem = _garbled(self.cache_file)
        if problem is None:
            return True
        problem = str(error) if problem == str(error) else f"{error}: {problem}"
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        aside = self.cache_file.with_name(f"{self.cache_file.name}.garbled-{stamp}-{os.getpid()}")
        for suffix in ("", "-wal", "-shm"):
            try:
                os.replace(f"{self.cache_file}{suffix}", f"{aside}{suffix}")
            except FileNotFoundError:
                pass
            except OSError as move_error:
                log.warning(
                    "digest cache %s is garbled (%s) and cannot be moved aside (%s)",
                    self.cache_file,
                    problem,
                    move_error,
                )
                return False
        log.warning(
            "digest cache %s is garbled (%s): moved to %s; a fresh cache is made, and each file is hashed once more",
            self.cache_file,
            problem,
            aside.name,
        )
        self._schema_ready = False
        return True

    def _use(self, action, default=None):
        """`action(connection)` in one transaction; `default` when the cache cannot be used. A cache found
        garbled on the way is set aside (and the action tried once on the fresh one)."""
        for attempt in range(2):
            con = self._connect()
            if con is None:
                return default
            try:
                with con:
                    return action(con)
            except sqlite3.DatabaseError as error:
                if attempt == 0 and self._set_aside_if_garbled(error):
                    continue
                return default  # busy past the timeout, disk full: the cache only saves time
            finally:
                con.close()
        return default

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        # Read whole before use: rows read from a file that turns out garbled half-way are not trusted.
        rows = self._use(
            lambda con: con.execute("SELECT path, size, mtime_ns, inode, ctime_ns, digest FROM files").fetchall(), []
        )
        for path, size, mtime, inode, ctime, digest in rows:
            self._files.setdefault(path, ((size, mtime, inode, ctime), digest))

    def _linked(self, identities: list[tuple[int, int, int, int, int]]) -> dict[tuple, str]:
        """Cached digests of files with these identities under any path (hard links made since)."""

        def lookup(con: sqlite3.Connection) -> dict[tuple, str]:
            found = {}
            for identity in identities:
                row = con.execute(
                    "SELECT digest FROM files WHERE device = ? AND inode = ? AND size = ? AND "
                    "mtime_ns = ? AND ctime_ns = ? LIMIT 1",
                    identity,
                ).fetchone()
                if row is not None:
                    found[identity] = row[0]
            return found

        return self._use(lookup, {}) if identities else {}

    def _store(self, rows: list[tuple]) -> None:
        if rows:
            self._use(lambda con: con.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?)", rows))

    # ------------------------------------------------------------------ fingerprints
    def _digests(self, entries: list[_Entry]) -> list[str]:
        with self._lock:
            self._load()
            out: list[str | None] = []
            missed = []
            for entry in entries:
                known = self._files.get(entry.absolute)
                out.append(known[1] if known is not None and known[0] == _signature(entry.stat) else None)
                hit = out[-1] is not None
                if not hit and entry.stat.st_ino and _identity(entry.stat) not in self._inodes:
                    missed.append(_identity(entry.stat))
            self._inodes.update(self._linked(missed))
            fresh = []
            now = time.time_ns()
            for index, entry in enumerate(entries):
                if out[index] is not None:
                    continue
                identity = _identity(entry.stat)
                # Inode 0 (some FUSE and network filesystems) names no file: no fallback there.
                digest = self._inodes.get(identity) if entry.stat.st_ino else None
                if digest is None:
                    digest = hash_file(entry.absolute)
                    self.hashed_bytes += entry.stat.st_size
                    self.hashed_files += 1
                self._files[entry.absolute] = (_signature(entry.stat), digest)
                if entry.stat.st_ino:
                    self._inodes[identity] = digest
                if now - entry.stat.st_mtime_ns > RACY_SECONDS * 1e9:
                    fresh.append((entry.absolute, *identity, digest))
                out[index] = digest
            self._store(fresh)
        return [digest for digest in out if digest is not None]  # every entry has one now

    def file(self, path: str | Path) -> str:
        path = Path(path).absolute()
        return self._digests([_Entry(path.name, str(path), path.stat())])[0]

    def path(self, path: str | Path) -> str:
        """Content fingerprint of a file or a folder, independent of where it lies on disk.

        Folders: every file by relative path and full content. A missing path is an error: a key must
        never be computed from something that is not there.
        """
        path = Path(path).absolute()
        if path.is_file():
            return self.file(path)
        if not path.is_dir():
            raise FileNotFoundError(f"cannot fingerprint {path}: no such file or folder")
        cached = self._folders.get(str(path))
        if cached is not None:
            return cached
        entries = files_under(path)
        listing = _listing(entries)
        result = self._known_folder(str(path), listing)
        if result is None:
            digests = self._digests(entries)
            result = blake3.blake3(
                "".join(f"{e.relative}\0{d}\n" for e, d in zip(entries, digests)).encode()
            ).hexdigest()
            racy = time.time_ns() - RACY_SECONDS * 1e9
            if all(e.stat.st_mtime_ns < racy for e in entries):
                self._store_folder(str(path), listing, result)
        self._folders[str(path)] = result
        return result

    def files(self, entries: list[_Entry]) -> list[str]:
        """Digests of these files (from `files_under`): through the cache, hashing only changed ones."""
        return self._digests(list(entries))

    def verified(self, folder: Path, listing: str) -> str | None:
        """What `remember_verified` recorded for this folder while its listing was this one, else None."""
        return self._known_folder(f"{folder}#verified", listing)

    def remember_verified(self, folder: Path, entries: list[_Entry], listing: str, value: str) -> None:
        """Record that the folder, as `listing` describes it, matched `value` (a manifest's content
        digest); not while a file is young enough that a same-second rewrite could hide (racy git)."""
        racy = time.time_ns() - RACY_SECONDS * 1e9
        if all(e.stat.st_mtime_ns < racy for e in entries):
            self._store_folder(f"{folder}#verified", listing, value)

    def _known_folder(self, path: str, listing: str) -> str | None:
        row = self._use(
            lambda con: con.execute("SELECT listing, digest FROM folders WHERE path = ?", (path,)).fetchone()
        )
        return row[1] if row is not None and row[0] == listing else None

    def _store_folder(self, path: str, listing: str, digest: str) -> None:
        self._use(lambda con: con.execute("INSERT OR REPLACE INTO folders VALUES (?, ?, ?)", (path, listing, digest)))


_GARBLED = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
# 2: files keyed by path *and* by (device, inode, ...), for hard links; version 1's `digests` table is dropped.
_CACHE_VERSION = 2


def _create_schema(con: sqlite3.Connection) -> None:
    con.execute("PRAGMA journal_mode=WAL")
    if con.execute("PRAGMA user_version").fetchone()[0] < _CACHE_VERSION:
        with con:
            con.execute("DROP TABLE IF EXISTS digests")
            con.execute(f"PRAGMA user_version = {_CACHE_VERSION}")
    with con:
        con.execute(
            "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, device INTEGER, inode INTEGER, "
            "size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER, digest TEXT)"
        )
        con.execute("CREATE INDEX IF NOT EXISTS files_by_inode ON files (device, inode)")
        # A whole folder whose listing (every file's stat signature) is unchanged: no per-file lookups.
        con.execute("CREATE TABLE IF NOT EXISTS folders (path TEXT PRIMARY KEY, listing TEXT, digest TEXT)")


def _garbled(cache_file: Path) -> str | None:
    """What is wrong with a cache file that SQLite refused as garbled, checked afresh; None if it is sound now."""
    try:
        con = sqlite3.connect(cache_file, timeout=30)
    except sqlite3.Error as error:
        return str(error)
    try:
        result = con.execute("PRAGMA quick_check(1)").fetchone()[0]
        return None if result == "ok" else " ".join(str(result).replace("*** in database main ***", "").split())
    except sqlite3.DatabaseError as error:
        if getattr(error, "sqlite_errorcode", None) in _GARBLED:
            return str(error)
        return None  # busy or locked: not garbled
    finally:
        con.close()


def fingerprinter_for(artifacts_root: str | Path) -> Fingerprinter:
    """A run's fingerprinter, remembering digests under `<artifacts root>/.cache/`."""
    return Fingerprinter(Path(artifacts_root).absolute() / ".cache" / DIGEST_CACHE)
