"""Claims: one claim file per shard (or per whole artifact), so concurrent runs on one artifacts root,
from one host or many sharing network storage, never compute or commit the same thing twice.

A claim is a lease with a fencing token (Chubby, etcd; Kleppmann's "How to do distributed locking"):
- **Taking a claim is one atomic step.** The claim file is written complete under a name unique to the
  claimant, then hard-linked to `<name>.claim` (`link` fails when the name exists: atomic on local
  filesystems and NFS, and its link count tells a success whose reply NFS lost). A stale claim is
  taken over by renaming it to a name unique to the taker: of two waiters only one rename succeeds.
  The taker then checks that what it moved is the claim it judged stale (same nonce, same mtime) and
  otherwise links it back (which fails if a newer claim is already there). Takers of one claim go one
  at a time (a takeover lock, itself taken the same way) and look at the claim again under it, so a
  claim a first taker already replaced is never moved by a second: one waiter wins, never two.
- **Each acquisition carries a nonce and a token.** The token counts the claim's holders (a hidden
  `.<name>.token` file next to the claims, written by each new holder), so it grows on every takeover.
  A holder checks the claim is still its own and its lease alive (`check`) just before it commits
  (a shard's files, an artifact's manifest): a worker that lost its claim raises `ClaimLost` instead
  of committing. `release` removes only a claim that is still its own.
- **The lease.** While its holder works, a background thread renews each claim (touches it every
  `RENEW_SECONDS`). A renewal that fails (NFS `ESTALE`) is logged and tried again at the next tick; a
  holder with no successful renewal for longer than the lease (its own monotonic clock) does not
  commit; a renewal that finds another worker's claim in place marks the claim lost.
- **Lease age is read on the storage's clock:** the claim's mtime against that of a file touched now
  in the same folder, never this host's `time.time()`, so clock skew between hosts and the file
  server neither takes over a live claim nor keeps a dead one.
- **Host identity** is the hostname, the boot id, the machine id and the pid namespace
  (`LECCR_HOST_ID` overrides it). A claim of this identity whose process is dead is taken over at
  once; any other claim only once its lease has run out (`LEASE_SECONDS`): containers that share a
  hostname, or a kernel, never judge each other's pids.
- **No claim outlives its holder for long:** one left by a worker killed between its commit and its
  release is swept away by the next `release_all` in its folder.

What no file protocol can promise (Kleppmann): a holder that stalls between its last check and its
commit (a stop, a swap storm) longer than the lease may still commit after a takeover. The check runs
immediately before the commit's writes, which leaves a window of milliseconds, not of a stage's work.
A whole-artifact stage writes its files into the artifact folder as it goes: a stalled holder's late
writes can land there beside its successor's (it writes no manifest); a file changed after the
successor's manifest is caught by the next verification as damaged.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HOST_ID_ENV = "LECCR_HOST_ID"
_VANISHED_GRACE = 0.2  # a claim briefly moved aside by another worker's takeover or release is back by then


class ClaimLost(RuntimeError):
    """A holder's claim was taken over, vanished, or its lease lapsed: the holder must not commit."""

    def __init__(self, name: str, folder: Path, token: int, reason: str, holder_now: str, consequence: str = ""):
        self.name, self.folder, self.token, self.reason, self.holder_now = name, folder, token, reason, holder_now
        super().__init__(
            f"claim {name!r} in {folder} is no longer this worker's (it held token {token}): {reason}; "
            f"held now by {holder_now}." + (f" {consequence}" if consequence else "")
        )


@dataclass(frozen=True)
class Holder:
    """What a claim file says at one moment, and whether its holder counts as alive."""

    host: str
    host_id: str | None
    pid: int
    nonce: str | None
    token: int
    mtime_ns: int
    alive: bool
    age: float | None  # seconds since its last renewal on the storage's clock (None: judged by its pid)

    def describe(self) -> str:
        where = (
            self.host
            if not self.host_id or self.host_id.startswith(f"{self.host}/")
            else f"{self.host} [{self.host_id}]"
        )
        age = f", renewed {self.age:.1f}s ago" if self.age is not None else ""
        return f"{where} pid {self.pid} (token {self.token}{age})"


@dataclass
class _Lease:
    nonce: str
    token: int
    renewed: float  # time.monotonic() before the last successful renewal (or the acquisition)
    lost: str | None = None  # why the claim is no longer this worker's


@dataclass(frozen=True)
class _Snapshot:
    record: dict[str, Any]
    mtime_ns: int


class Claims:
    """Claims on named pieces of work under one folder (`<folder>/_claims/<name>.claim`).

    `acquire(name)` is False while another live worker holds the claim. Every claim this object
    holds is renewed by one background thread until it is released; `check(name)` raises `ClaimLost`
    when the claim is no longer this object's, and is called just before a commit.
    """

    LEASE_SECONDS = 120.0  # a claim from another host not renewed for this long is taken over
    RENEW_SECONDS = 20.0  # how often a holder renews its claims (well inside the lease)

    def __init__(
        self,
        folder: Path,
        lease_seconds: float | None = None,
        renew_seconds: float | None = None,
        host_id: str | None = None,
    ):
        self.folder = Path(folder) / "_claims"
        self.lease_seconds = lease_seconds if lease_seconds is not None else self.LEASE_SECONDS
        self.renew_seconds = renew_seconds if renew_seconds is not None else self.RENEW_SECONDS
        self.host_id = host_id or host_identity()
        self._leases: dict[str, _Lease] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.claim"

    def _counter(self, name: str) -> Path:
        return self.folder / f".{name}.token"  # hidden: never part of an artifact's files

    @property
    def held(self) -> set[str]:
        """Names this object holds and has not lost."""
        with self._lock:
            return {name for name, lease in self._leases.items() if lease.lost is None}

    # ----------------------------------------------------------------------------- acquiring
    def acquire(self, name: str) -> bool:
        """Claim `name` (True also when this object holds it already); False while another live worker
        holds it. A stale claim (its process dead on this host, or its lease run out) is taken over."""
        with self._lock:
            lease = self._leases.get(name)
        if lease is not None:
            if lease.lost is None:
                return True
            self.release(name)  # lost (lapsed, say): our file, if still in place, must not block us
        floor = 0  # the token of a claim taken over: the new one is higher
        for _ in range(3):  # again after a claim vanished or was taken over meanwhile
            self.folder.mkdir(parents=True, exist_ok=True)
            if self._create(name, floor):
                return True
            try:
                seen = self.holder(name)
            except OSError as error:  # unreadable right now (NFS ESTALE): as if held; the caller polls again
                log.warning("cannot read claim %s (%s): treated as held", self._path(name), error)
                return False
            if seen is None:
                continue  # released meanwhile
            if seen.alive:
                return False
            floor = max(floor, seen.token)
            self._take_over(name, seen)
        return False

    def wait_acquire(
        self,
        name: str,
        logger: logging.Logger | logging.LoggerAdapter | None = None,
        what: str = "",
        poll_seconds: float = 1.0,
    ) -> None:
        """Acquire `name`, waiting while a live worker holds it (a stale claim is taken over)."""
        waited = False
        while not self.acquire(name):
            if not waited:
                holder = self._holder_or_none(name)
                (logger or log).info(
                    "%swaiting for claim %s, held by %s",
                    f"{what}: " if what else "",
                    name,
                    holder.describe() if holder else "another worker",
                )
                waited = True
            time.sleep(poll_seconds)

    @contextlib.contextmanager
    def holding(
        self, name: str, logger: logging.Logger | logging.LoggerAdapter | None = None, what: str = ""
    ) -> Iterator[None]:
        """Hold `name` for a block (waiting for a live holder); released after unless held before."""
        held_before = name in self.held
        self.wait_acquire(name, logger, what)
        try:
            yield
        finally:
            if not held_before:
                self.release(name)

    def _create(self, name: str, floor: int) -> bool:
        nonce = uuid.uuid4().hex
        token = max(self._read_counter(name), floor) + 1
        renewed = time.monotonic()
        if not self._link_new(self._path(name), {**self._record(nonce), "token": token}):
            return False
        try:
            counter = self.folder / f".{name}.token-{nonce}"
            counter.write_text(f"{token}\n", encoding="utf-8")
            os.replace(counter, self._counter(name))  # whole or not at all; no fsync: the nonce, not the token, fences
        except OSError:
            self._remove_own(self._path(name), nonce)  # no counter, no claim: a later holder must not reuse the token
            raise
        with self._lock:
            self._leases[name] = _Lease(nonce, token, renewed)
        self._start_renewing()
        return True

    def _record(self, nonce: str) -> dict[str, Any]:
        return {**_me(), "host_id": self.host_id, "nonce": nonce}

    def _link_new(self, path: Path, record: dict[str, Any]) -> bool:
        """Create `path` holding `record`, whole, unless it exists: a file under a unique name, hard-linked."""
        draft = path.with_name(f".{path.name}.{record['nonce']}.new")
        draft.write_text(json.dumps(record), encoding="utf-8")
        try:
            os.link(draft, path)
            return True
        except FileExistsError:
            return os.stat(draft).st_nlink == 2  # 2: NFS made the link and lost its reply
        finally:
            draft.unlink(missing_ok=True)

    def _take_over(self, name: str, seen: Holder) -> bool:
        """Remove the stale claim `seen`; True when this worker removed exactly that claim.

        Takers go one at a time (a takeover lock next to the claim), and each looks at the claim again
        under the lock: a claim another taker already replaced is never moved, so no fresh claim is
        ever displaced (which would let a third worker create one in the gap, and two hold it)."""
        lock = self.folder / f".{name}.takeover"
        nonce = uuid.uuid4().hex
        try:
            if not self._link_new(lock, self._record(nonce)):
                taker = _snapshot(lock)
                if taker is not None and not self._alive(taker.record, taker.mtime_ns)[0]:
                    self._displace(lock, taker)  # its taker died mid-takeover
                return False
        except OSError as error:
            log.warning("cannot take over claim %s (%s); trying again later", self._path(name), error)
            return False
        try:
            now = _snapshot(self._path(name))
            if now is None or (now.record.get("nonce"), now.mtime_ns) != (seen.nonce, seen.mtime_ns):
                return False  # released, renewed or replaced since it was judged: judged again by the caller
            if not self._displace(self._path(name), now):
                return False
            log.info(
                "took over claim %s from %s: %s",
                self._path(name),
                seen.describe(),
                "its process is dead" if seen.age is None else f"lease of {self.lease_seconds:.0f}s ran out",
            )
            return True
        except OSError as error:
            log.warning("cannot take over claim %s (%s); trying again later", self._path(name), error)
            return False
        finally:
            self._remove_own(lock, nonce)

    def _displace(self, path: Path, seen: _Snapshot) -> bool:
        """Remove the file `seen` judged stale: renamed to a name unique to this worker (of two, one rename
        succeeds), then checked to be that very file (same nonce and mtime), else linked back (which
        fails if a newer one is in place)."""
        aside = path.with_name(f".{path.name}.taken-{uuid.uuid4().hex}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            if not aside.exists():  # another worker was first (unless NFS lost the reply of our rename)
                return False
        try:
            moved = _snapshot(aside)
        except OSError:
            moved = None
        if moved is not None and (moved.record.get("nonce"), moved.mtime_ns) == (
            seen.record.get("nonce"),
            seen.mtime_ns,
        ):
            aside.unlink(missing_ok=True)
            return True
        try:  # renewed or replaced since it was judged: not ours to remove
            os.link(aside, path)
        except FileExistsError:  # a newer one took the name meanwhile: the moved one's holder has lost it
            log.warning("%s moved aside during a takeover and replaced meanwhile", path)
        finally:
            aside.unlink(missing_ok=True)
        return False

    # ----------------------------------------------------------------------------- judging
    def holder(self, name: str) -> Holder | None:
        """Who holds `name` now (None: nobody), and whether that holder counts as alive."""
        snap = _snapshot(self._path(name))
        if snap is None:
            return None
        record = snap.record
        alive, age = self._alive(record, snap.mtime_ns)
        return Holder(
            host=str(record.get("host", "?")),
            host_id=record.get("host_id"),
            pid=_int(record.get("pid"), -1),
            nonce=record.get("nonce"),
            token=_int(record.get("token"), 0),
            mtime_ns=snap.mtime_ns,
            alive=alive,
            age=age,
        )

    def _alive(self, record: dict[str, Any], mtime_ns: int) -> tuple[bool, float | None]:
        """Whether the writer of a claim (or takeover lock) counts as alive, and its lease's age."""
        if record.get("host_id") == self.host_id:  # this host, this pid namespace: the pid says it all
            return _process_alive(_int(record.get("pid"), -1), record.get("started")), None
        age = (self._storage_now_ns() - mtime_ns) / 1e9
        return age < self.lease_seconds, age

    def _holder_or_none(self, name: str) -> Holder | None:
        try:
            return self.holder(name)
        except OSError:
            return None

    def _storage_now_ns(self) -> int:
        """Now on the storage's clock: the mtime of a file touched now in the claims folder."""
        clock = self.folder / f".clock-{uuid.uuid4().hex}"
        os.close(os.open(clock, os.O_CREAT | os.O_WRONLY, 0o644))
        try:
            os.utime(clock, None)  # NFS: set to the server's time
            return os.stat(clock).st_mtime_ns
        finally:
            clock.unlink(missing_ok=True)

    def _read_counter(self, name: str) -> int:
        try:
            return int(self._counter(name).read_text(encoding="utf-8").strip() or 0)
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as error:
            log.warning(
                "unreadable token counter %s (%s): counting from the claim in place", self._counter(name), error
            )
            return 0

    # ----------------------------------------------------------------------------- holding
    def token(self, name: str) -> int:
        with self._lock:
            return self._leases[name].token

    def check(self, name: str, consequence: str = "") -> int:
        """Just before a commit: raise `ClaimLost` unless `name` is still this object's claim with a live
        lease; returns its token. `consequence` says what happens to the work (into the message)."""
        with self._lock:
            lease = self._leases.get(name)
        if lease is None:
            raise ClaimLost(name, self.folder, 0, "this worker never held it", self._describe_now(name), consequence)
        if lease.lost is None:
            silent = time.monotonic() - lease.renewed
            if silent > self.lease_seconds:
                self._lose(
                    name,
                    lease,
                    f"its lease lapsed (no successful renewal for {silent:.1f}s, lease {self.lease_seconds:.0f}s)",
                )
            else:
                try:
                    self._verify(name, lease)
                except OSError as error:
                    self._lose(name, lease, f"its claim file cannot be read to confirm it ({error})")
        if lease.lost is not None:
            raise ClaimLost(name, self.folder, lease.token, lease.lost, self._describe_now(name), consequence)
        return lease.token

    def _verify(self, name: str, lease: _Lease) -> bool:
        """Whether the claim file is still this lease's (marks it lost otherwise)."""
        path = self._path(name)
        snap = _snapshot(path)
        if snap is None:  # maybe moved aside for a moment by another worker's takeover or release
            time.sleep(_VANISHED_GRACE)
            snap = _snapshot(path)
        if snap is None:
            self._lose(name, lease, "its claim file is gone (taken over, or its folder discarded)")
            return False
        if snap.record.get("nonce") != lease.nonce:
            self._lose(name, lease, "another worker took it over")
            return False
        return True

    def _lose(self, name: str, lease: _Lease, reason: str) -> None:
        if lease.lost is not None:
            return
        lease.lost = reason
        with self._lock:
            registered = self._leases.get(name) is lease
        if registered:  # (a lease released meanwhile has nothing left to lose)
            log.warning("claim %s lost: %s; this worker will not commit its work", self._path(name), reason)

    def _describe_now(self, name: str) -> str:
        holder = self._holder_or_none(name)
        if holder is None:
            return "nobody"
        if holder.nonce is not None and holder.nonce in self._nonces():
            return "no one else yet (any worker may take it over now)"
        return holder.describe()

    def _nonces(self) -> set[str]:
        with self._lock:
            return {lease.nonce for lease in self._leases.values()}

    def renew(self) -> None:
        """Touch every held claim that is still this object's: its lease starts again. An error leaves
        the claim to the next tick; a claim found in another worker's hands is marked lost."""
        with self._lock:
            leases = [(name, lease) for name, lease in self._leases.items() if lease.lost is None]
        for name, lease in leases:
            started = time.monotonic()
            try:
                if self._verify(name, lease):
                    os.utime(self._path(name), None)  # NFS: the server's time
                    lease.renewed = started
            except FileNotFoundError:  # moved away between the check and the touch
                self._verify(name, lease)
            except OSError as error:
                silent = time.monotonic() - lease.renewed
                log.warning(
                    "could not renew claim %s (%s); retrying in %.0fs (last renewed %.0fs ago, lease %.0fs)",
                    self._path(name),
                    error,
                    self.renew_seconds,
                    silent,
                    self.lease_seconds,
                )

    def _start_renewing(self) -> None:
        with self._lock:
            if self._renewer is not None:
                return
            self._stop.clear()

            def loop() -> None:
                while not self._stop.wait(self.renew_seconds):
                    try:
                        self.renew()
                    except Exception:  # noqa: BLE001 - the renewer must outlive any one failure
                        log.exception("claim renewal failed; retrying at the next tick")

            self._renewer = threading.Thread(target=loop, name="claim-lease", daemon=True)
            self._renewer.start()

    # ----------------------------------------------------------------------------- releasing
    def release(self, name: str) -> None:
        """Remove the claim if it is still this object's; a claim another worker took over is left to it."""
        with self._lock:
            lease = self._leases.pop(name, None)
        if lease is None:
            return
        try:
            self._remove_own(self._path(name), lease.nonce)
        except OSError as error:
            log.warning(
                "could not release claim %s (%s); its lease runs out in %.0fs",
                self._path(name),
                error,
                self.lease_seconds,
            )

    def _remove_own(self, path: Path, nonce: str) -> None:
        """Remove `path` only if it is still the file this worker wrote (its nonce)."""
        snap = _snapshot(path)
        if snap is None or snap.record.get("nonce") != nonce:
            return  # taken over: the claim in place is the new holder's
        aside = path.with_name(f".{path.name}.released-{nonce}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return
        moved = _snapshot(aside)
        if moved is None or moved.record.get("nonce") != nonce:  # taken over between the read and the rename
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)
        aside.unlink(missing_ok=True)

    def sweep(self) -> int:
        """Remove the claims of dead holders in this folder (a worker killed between its commit and its
        release leaves one behind, on a shard no one claims again); the number removed."""
        removed = 0
        for path in sorted(self.folder.glob("*.claim")):
            name = path.name[: -len(".claim")]
            try:
                seen = self.holder(name)
                if seen is not None and not seen.alive and self._take_over(name, seen):
                    removed += 1
            except OSError as error:
                log.debug("sweeping claim %s: %s", path, error)
        return removed

    def release_all(self) -> None:
        with self._lock:
            names = list(self._leases)
        for name in names:
            self.release(name)
        self.sweep()
        self._stop.set()
        renewer, self._renewer = self._renewer, None
        if renewer is not None:
            renewer.join()


def artifact_claims(root: str | Path, stage: str) -> Claims:
    """The claims on a stage's artifacts, one per key (`<root>/<stage>/_claims/<key>.claim`): held by the
    run that makes an artifact, and by whatever discards one (`--force`, a damaged artifact, `leccr gc`)."""
    return Claims(Path(root) / stage)


def shard_claim(index: int) -> str:
    return f"part-{index:05d}"


def host_identity() -> str:
    """This worker's host as claims see it: `LECCR_HOST_ID` when set, else hostname, boot id, machine id
    and pid namespace (containers on one kernel share the boot id, not the pid namespace)."""
    return os.environ.get(HOST_ID_ENV) or _machine_identity()


@functools.cache
def _machine_identity() -> str:
    parts = [socket.gethostname()]
    for source in ("/proc/sys/kernel/random/boot_id", "/etc/machine-id"):
        try:
            parts.append(Path(source).read_text(encoding="utf-8").strip() or "-")
        except OSError:
            parts.append("-")
    try:
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        parts.append("-")
    return "/".join(parts)


def _snapshot(path: Path) -> _Snapshot | None:
    """A claim file's record and mtime, read from one open file (None: there is none). A record that is
    not JSON is kept as {} (its holder unknown: judged by its lease)."""
    try:
        with open(path, "rb") as handle:
            mtime_ns = os.fstat(handle.fileno()).st_mtime_ns
            raw = handle.read()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        record = {}
    return _Snapshot(record if isinstance(record, dict) else {}, mtime_ns)


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


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
