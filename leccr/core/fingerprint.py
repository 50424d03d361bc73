"""Content fingerprints of files and folders, each file hashed in full and, while unchanged, only once.

A cache key must change when any byte of a model, a dataset or an import file changes, so every file
is hashed whole — weights and media included (BLAKE3, several threads over a memory map). Rereading
a 20 GB dataset on every run would make a cached rerun slow, so digests are remembered in a small
SQLite table keyed by what `stat` says of the file: (absolute path, size, mtime_ns, inode, ctime_ns),
the way git's index and DVC's state database avoid rereading unchanged files. Writing a file changes
its mtime and ctime (even `head -c SIZE /dev/urandom > F`, which keeps the size), so the next lookup
misses and the file is hashed again.

Racy entries: a file written within the same clock tick as its hashing could change again without a
visible mtime change. Like git, entries whose mtime is younger than `RACY_SECONDS` at hashing time are
used for this run but not stored.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import blake3

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
    return blake3.blake3("".join(
        f"{e.relative}\0{e.stat.st_size}\0{e.stat.st_mtime_ns}\0{e.stat.st_ino}\0{e.stat.st_ctime_ns}\n"
        for e in entries).encode()).hexdigest()


class Fingerprinter:
    """Fingerprints of files and folders for one run, backed by a persistent digest cache.

    One instance per run: a path asked for twice is fingerprinted once (folders are memoised by path
    for the life of the instance, files by their stat signature). `cache_file=None` keeps digests in
    memory only.
    """

    def __init__(self, cache_file: str | Path | None = None):
        self.cache_file = Path(cache_file) if cache_file is not None else None
        self._files: dict[str, tuple[tuple[int, int, int, int], str]] = {}
        self._folders: dict[str, str] = {}
        self._loaded = False
        self._lock = threading.Lock()
        self.hashed_bytes = 0  # bytes read this run (a warm rerun reads none)
        self.hashed_files = 0

    # ------------------------------------------------------------------ persistent cache
    def _connect(self) -> sqlite3.Connection | None:
        if self.cache_file is None:
            return None
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            con = sqlite3.connect(self.cache_file, timeout=30)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY, size INTEGER, "
                        "mtime_ns INTEGER, inode INTEGER, ctime_ns INTEGER, digest TEXT)")
            # A whole folder whose listing (every file's stat signature) is unchanged: no per-file lookups.
            con.execute("CREATE TABLE IF NOT EXISTS folders (path TEXT PRIMARY KEY, listing TEXT, digest TEXT)")
            return con
        except (OSError, sqlite3.Error):
            return None  # a read-only or odd filesystem: hash without remembering

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        con = self._connect()
        if con is None:
            return
        with con:
            for path, size, mtime, inode, ctime, digest in con.execute("SELECT * FROM digests"):
                self._files.setdefault(path, ((size, mtime, inode, ctime), digest))
        con.close()

    def _store(self, rows: list[tuple]) -> None:
        if not rows:
            return
        con = self._connect()
        if con is None:
            return
        try:
            with con:
                con.executemany("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?, ?)", rows)
        except sqlite3.Error:
            pass  # the cache only saves time; a failed write costs a rehash next run
        finally:
            con.close()

    # ------------------------------------------------------------------ fingerprints
    def _digests(self, entries: list[_Entry]) -> list[str]:
        with self._lock:
            self._load()
            out, fresh = [], []
            now = time.time_ns()
            for entry in entries:
                signature = _signature(entry.stat)
                known = self._files.get(entry.absolute)
                if known is not None and known[0] == signature:
                    out.append(known[1])
                    continue
                digest = hash_file(entry.absolute)
                self.hashed_bytes += entry.stat.st_size
                self.hashed_files += 1
                self._files[entry.absolute] = (signature, digest)
                if now - entry.stat.st_mtime_ns > RACY_SECONDS * 1e9:
                    fresh.append((entry.absolute, *signature, digest))
                out.append(digest)
            self._store(fresh)
        return out

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
            result = blake3.blake3("".join(f"{e.relative}\0{d}\n" for e, d in zip(entries, digests)).encode()
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
        con = self._connect()
        if con is None:
            return None
        try:
            row = con.execute("SELECT listing, digest FROM folders WHERE path = ?", (path,)).fetchone()
        except sqlite3.Error:
            row = None
        finally:
            con.close()
        return row[1] if row is not None and row[0] == listing else None

    def _store_folder(self, path: str, listing: str, digest: str) -> None:
        con = self._connect()
        if con is None:
            return
        try:
            with con:
                con.execute("INSERT OR REPLACE INTO folders VALUES (?, ?, ?)", (path, listing, digest))
        except sqlite3.Error:
            pass
        finally:
            con.close()


def fingerprinter_for(artifacts_root: str | Path) -> Fingerprinter:
    """A run's fingerprinter, remembering digests under `<artifacts root>/.cache/`."""
    return Fingerprinter(Path(artifacts_root).absolute() / ".cache" / DIGEST_CACHE)
