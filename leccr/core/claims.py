"""Claims: one claim file per shard (or per whole artifact), so concurrent runs on one artifact root
never compute the same thing twice.

A claim is created with O_CREAT|O_EXCL (atomic on local filesystems and NFSv3+) and holds the
claimant's host, pid and process start time. While its holder works, a background thread renews the
claim's lease (touches it every `RENEW_SECONDS`), so a claim from another host is trusted while its
lease is fresh however long the work takes, and taken over once the lease has run out
(`LEASE_SECONDS`: its holder died or lost the shared filesystem). On the same host a dead pid frees it
at once. The img2dataset writers do the same per shard.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any


class Claims:
    """Claims on named pieces of work under one folder (`<folder>/_claims/<name>.claim`).

    `acquire(name)` is False while another live worker holds the claim. Every claim this object
    holds is renewed by one background thread until it is released.
    """

    LEASE_SECONDS = 120.0  # a claim from another host not renewed for this long is taken over
    RENEW_SECONDS = 20.0  # how often a holder renews its claims (well inside the lease)

    def __init__(self, folder: Path, lease_seconds: float | None = None, renew_seconds: float | None = None):
        self.folder = folder / "_claims"
        self.lease_seconds = lease_seconds if lease_seconds is not None else self.LEASE_SECONDS
        self.renew_seconds = renew_seconds if renew_seconds is not None else self.RENEW_SECONDS
        self.held: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.claim"

    def acquire(self, name: str) -> bool:
        """Claim `name`; False when another live worker holds it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(name)
        for _ in range(2):  # once more after removing a stale claim
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self.holder_alive(name):
                    return False
                path.unlink(missing_ok=True)  # stale: its worker died (kill -9, power cut) or its lease ran out
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(_me(), handle)
            with self._lock:
                self.held.add(name)
            self._start_renewing()
            return True
        return False

    def holder_alive(self, name: str) -> bool:
        path = self._path(name)
        try:
            holder = json.loads(path.read_text(encoding="utf-8"))
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return False
        except (OSError, ValueError):
            try:
                return time.time() - path.stat().st_mtime < 5  # being written right now, or garbage
            except FileNotFoundError:
                return False
        if holder.get("host") != socket.gethostname():
            return age < self.lease_seconds  # renewed by its holder while it works
        return _process_alive(int(holder.get("pid", -1)), holder.get("started"))

    def renew(self) -> None:
        """Touch every held claim: its lease starts again."""
        with self._lock:
            names = list(self.held)
        for name in names:
            try:
                os.utime(self._path(name))
            except FileNotFoundError:
                pass  # released meanwhile

    def _start_renewing(self) -> None:
        if self._renewer is not None:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(self.renew_seconds):
                self.renew()

        self._renewer = threading.Thread(target=loop, name="claim-lease", daemon=True)
        self._renewer.start()

    def release(self, name: str) -> None:
        with self._lock:
            if name not in self.held:
                return
            self.held.discard(name)
        self._path(name).unlink(missing_ok=True)

    def release_all(self) -> None:
        with self._lock:
            names = list(self.held)
        for name in names:
            self.release(name)
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        try:
            self.folder.rmdir()  # only when no other worker still holds a claim
        except OSError:
            pass


def shard_claim(index: int) -> str:
    return f"part-{index:05d}"


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
