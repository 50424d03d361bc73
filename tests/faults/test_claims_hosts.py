"""Claims on shared storage across hosts: simulated hosts (distinct host identities, `host_id=` or
`LECCR_HOST_ID`, on one machine) against one artifacts root.

A holder that stalls past its lease is taken over and then must not commit; a renewal that fails for a
while keeps the claim; two waiters racing for one stale claim get it once; a release after a takeover
leaves the new holder's claim; lease age is read on the storage's clock; containers sharing a hostname
judge each other by lease, not pid; `--force` and every discard take the artifact's claim first.
Leases are a second long here (constructor arguments), so each case takes a few seconds at most.
"""
import dataclasses
import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

import leccr.core.execute as execute
from leccr.config import parse_config
from leccr.core.artifact import MANIFEST
from leccr.core.claims import ClaimLost, Claims, host_identity
from leccr.core.fingerprint import fingerprinter_for
from leccr.core.jobs import key_parts
from leccr.core.shards import ShardJob, ShardResult
from leccr.records.gc import Garbage, delete
from tests.conftest import demo_config_dict
from tests.test_store import ROWS, _ctx

REPO = Path(__file__).parents[2]
LEASE, RENEW = 1.0, 0.1  # seconds
NAME = "part-00000"


def _host(root: Path, host: str, renew: float = RENEW) -> Claims:
    return Claims(root, lease_seconds=LEASE, renew_seconds=renew, host_id=host)


def _claim(root: Path, name: str = NAME) -> Path:
    return root / "_claims" / f"{name}.claim"


def _last_renewed(claim: Path, seconds_ago: float) -> None:
    """Set the claim's mtime as its holder's last renewal `seconds_ago` (this machine's disk is the storage)."""
    then = time.time() - seconds_ago
    os.utime(claim, (then, then))


def _dead_claim(root: Path, name: str = NAME, seconds_ago: float = 10.0) -> Path:
    """The claim of a holder on a host that went away, last renewed `seconds_ago`."""
    claim = _claim(root, name)
    claim.parent.mkdir(parents=True, exist_ok=True)
    claim.write_text(json.dumps({"host": "gone", "host_id": "host-gone", "pid": 1, "nonce": "dead", "token": 1}))
    _last_renewed(claim, seconds_ago)
    return claim


def _held_by(claim: Path) -> str:
    return json.loads(claim.read_text())["host_id"]


# ------------------------------------------------------------------------------------------ the lease
HOLDER = """
import sys
from pathlib import Path
from leccr.core.claims import ClaimLost, Claims

root = Path(sys.argv[1])
claims = Claims(root, lease_seconds=1.0, renew_seconds=0.1)  # host identity: LECCR_HOST_ID
assert claims.acquire("part-00000")
print("token", claims.token("part-00000"), flush=True)
sys.stdin.readline()  # the work (stopped here, then resumed)
try:
    claims.check("part-00000", "host-a does not commit.")
except ClaimLost as lost:
    print("lost:", lost, flush=True)
else:
    (root / "part-00000.parquet").write_text("host-a")
    print("committed", flush=True)
finally:
    claims.release_all()
"""


def test_a_stalled_holder_is_taken_over_by_another_host_and_then_does_not_commit(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "LECCR_HOST_ID": "host-a"}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    other = _host(tmp_path, "host-b")
    try:
        assert holder.stdout.readline().split() == ["token", "1"]
        assert not other.acquire(NAME)  # host-a renews its lease: held
        os.kill(holder.pid, signal.SIGSTOP)  # stalled (a stopped VM, a swap storm): its renewals stop too
        deadline = time.monotonic() + 10 * LEASE
        while not other.acquire(NAME):
            assert time.monotonic() < deadline, "the stalled holder's claim was never taken over"
            time.sleep(0.1)
        assert _held_by(_claim(tmp_path)) == "host-b"
        os.kill(holder.pid, signal.SIGCONT)
        said, _ = holder.communicate("go on\n", timeout=60)
    finally:
        holder.kill()
        holder.wait()
    assert said.startswith("lost: claim 'part-00000'") and "held now by" in said and "[host-b]" in said, said
    assert "(token 2" in said and said.rstrip().endswith("host-a does not commit.")
    assert not (tmp_path / "part-00000.parquet").exists()
    assert _held_by(_claim(tmp_path)) == "host-b" and other.check(NAME) == 2  # its release left host-b's claim
    other.release_all()
    assert not _claim(tmp_path).exists()


def test_a_renewal_failing_for_a_while_keeps_the_claim_and_one_failing_past_the_lease_stops_the_commit(
        tmp_path, monkeypatch, caplog):
    holder, other = _host(tmp_path, "host-a"), _host(tmp_path, "host-b")
    assert holder.acquire(NAME)
    utime, failures = os.utime, {"left": 4}

    def flaky(path, *args, **kwargs):  # the file server answers ESTALE to the renewals for a while
        if str(path).endswith(".claim") and failures["left"] > 0:
            failures["left"] -= 1
            raise OSError(errno.ESTALE, "Stale file handle")
        return utime(path, *args, **kwargs)

    monkeypatch.setattr(os, "utime", flaky)
    started = time.monotonic()
    while time.monotonic() - started < 2 * LEASE:  # 4 failed ticks (0.4 of a lease), then renewed again
        assert not other.acquire(NAME)
        time.sleep(0.2)
    assert failures["left"] == 0 and "could not renew claim" in caplog.text
    assert holder.check(NAME) == 1

    failures["left"] = 10**6  # now past the lease: the holder must not commit, even though no one took it yet
    time.sleep(1.5 * LEASE)
    with pytest.raises(ClaimLost, match=r"its lease lapsed \(no successful renewal for"):
        holder.check(NAME, "nothing is committed.")
    assert other.acquire(NAME) and other.token(NAME) == 2  # and on the storage its lease ran out
    holder.release_all()
    assert _held_by(_claim(tmp_path)) == "host-b"
    other.release_all()


# ------------------------------------------------------------------------------------------ takeover and release
def test_two_waiters_racing_for_one_stale_claim_get_it_once(tmp_path, monkeypatch):
    _dead_claim(tmp_path)
    waiters = [_host(tmp_path, f"host-{i}") for i in range(4)]
    barrier = threading.Barrier(len(waiters), timeout=10)
    judged = threading.local()
    judge = Claims.holder

    def judge_together(self, name):  # every waiter has judged the claim stale before any of them acts
        seen = judge(self, name)
        if not getattr(judged, "once", False):
            judged.once = True
            barrier.wait()
        return seen

    won: list[bool] = [False] * len(waiters)

    def wait(i: int) -> None:
        won[i] = waiters[i].acquire(NAME)

    with monkeypatch.context() as together:
        together.setattr(Claims, "holder", judge_together)
        threads = [threading.Thread(target=wait, args=(i,)) for i in range(len(waiters))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sum(won) == 1, won
    winner = waiters[won.index(True)]
    assert _held_by(_claim(tmp_path)) == winner.host_id and winner.check(NAME) == 2
    assert not any(w.acquire(NAME) for w in waiters if w is not winner)
    for waiter in waiters:
        waiter.release_all()
    assert not _claim(tmp_path).exists()


def test_a_release_after_a_takeover_leaves_the_new_holders_claim(tmp_path):
    first = _host(tmp_path, "host-a", renew=60.0)  # its renewals stop (a lost mount): the lease runs out
    assert first.acquire(NAME)
    _last_renewed(_claim(tmp_path), 10.0)
    second = _host(tmp_path, "host-b")
    assert second.acquire(NAME)
    first.release(NAME)  # the worker that lost it finishes, and releases what it believes it holds
    assert _claim(tmp_path).is_file() and _held_by(_claim(tmp_path)) == "host-b"
    assert not _host(tmp_path, "host-c").acquire(NAME)  # a third worker waits for host-b
    assert second.check(NAME) == 2  # the token grew with the takeover
    first.release_all()
    second.release_all()


# ------------------------------------------------------------------------------------------ clocks and hosts
def test_lease_age_is_read_on_the_storage_clock_not_this_hosts(tmp_path, monkeypatch):
    real_time = time.time
    holder = _host(tmp_path, "host-a")
    assert holder.acquire(NAME)
    with monkeypatch.context() as skewed:  # this host's clock an hour ahead of the file server's
        skewed.setattr(time, "time", lambda: real_time() + 3600)
        assert not _host(tmp_path, "host-b").acquire(NAME)  # renewed a moment ago on the storage: held
    holder.release_all()

    _dead_claim(tmp_path, seconds_ago=10.0)  # last renewed 10 s ago on the storage's clock
    with monkeypatch.context() as skewed:  # this host's clock an hour behind: the claim's mtime is "future"
        skewed.setattr(time, "time", lambda: real_time() - 3600)
        taker = _host(tmp_path, "host-b")
        assert taker.acquire(NAME)  # stale on the storage's clock: taken over
    assert taker.check(NAME) == 2
    taker.release_all()


def test_containers_sharing_a_hostname_judge_each_others_claims_by_lease_not_pid(tmp_path, monkeypatch):
    monkeypatch.delenv("LECCR_HOST_ID", raising=False)
    ours, hostname = host_identity(), socket.gethostname()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)  # no such process here; in the other container it is the live holder
    claim = _claim(tmp_path)
    claim.parent.mkdir(parents=True)
    other_container = "/".join([*ours.split("/")[:-1], "pid:[4026599999]"])  # same hostname and kernel
    claim.write_text(json.dumps({"host": hostname, "host_id": other_container, "pid": dead_pid, "started": "1",
                                 "nonce": "c2", "token": 1}))
    mine = Claims(tmp_path, lease_seconds=LEASE)
    assert not mine.acquire(NAME)  # another pid namespace: its pid means nothing here, its fresh lease does
    _last_renewed(claim, 10.0)
    assert mine.acquire(NAME)  # its lease ran out: taken over
    mine.release_all()
    claim.write_text(json.dumps({"host": hostname, "host_id": ours, "pid": dead_pid, "started": "1", "nonce": "c3",
                                 "token": 5}))
    assert mine.acquire(NAME) and mine.token(NAME) == 6  # this identity and a dead pid: taken over at once
    mine.release_all()

    # The identity: hostname, boot id, machine id, pid namespace; LECCR_HOST_ID replaces it.
    assert ours.split("/") == [hostname, Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
                               Path("/etc/machine-id").read_text().strip() if Path("/etc/machine-id").is_file()
                               else "-", os.readlink("/proc/self/ns/pid")]
    monkeypatch.setenv("LECCR_HOST_ID", "set-by-env")
    assert host_identity() == "set-by-env" and Claims(tmp_path).host_id == "set-by-env"


# ------------------------------------------------------------------------------------------ commits
@pytest.mark.parametrize("background", [False, True])
def test_a_shard_whose_claim_was_taken_over_is_not_committed(tmp_path, background):
    ctx = _ctx(tmp_path)
    taker = _host(ctx.out_dir, "host-b")

    def process(items, index):  # while this worker computes, its lease runs out and host-b takes the shard
        _last_renewed(_claim(ctx.out_dir), 10.0)
        assert taker.acquire(NAME)
        return ShardResult(pa.table({"item_id": [f"id{i}" for i in items], "value": pa.array(items, pa.int64())}))

    job = ShardJob(list(range(4)), 4, ROWS, item_id=str, process=process, unit_of=lambda i: f"id{i}",
                   background_write=background)
    with pytest.raises(ClaimLost, match="Shard 0 of toy is not committed by this worker"):
        ctx.run_shards(job)
    assert not (ctx.out_dir / "part-00000.parquet").exists()
    assert not (ctx.out_dir / "_errors" / "part-00000.parquet").exists()
    assert taker.check(NAME) == 2  # the loser's release left the new holder's claim
    taker.release_all()


def test_a_claim_left_by_a_worker_killed_after_its_commit_is_cleared_by_the_next_run(tmp_path):
    ctx = _ctx(tmp_path)

    def process(items, index):
        return ShardResult(pa.table({"item_id": [f"id{i}" for i in items], "value": pa.array(items, pa.int64())}))

    job = ShardJob(list(range(8)), 4, ROWS, item_id=str, process=process, unit_of=lambda i: f"id{i}")
    ctx.run_shards(job)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _claim(ctx.out_dir, "part-00001").parent.mkdir(exist_ok=True)
    _claim(ctx.out_dir, "part-00001").write_text(json.dumps(  # killed between its part file and its release
        {"host": socket.gethostname(), "host_id": host_identity(), "pid": int(gone.stdout), "nonce": "k", "token": 1}))
    totals = ctx.run_shards(job)  # both shards are committed: no one claims shard 1 again
    assert totals.shards_resumed == 2 and not list((ctx.out_dir / "_claims").glob("*.claim"))


def _in_thread(call, *args, **kwargs) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def target():
        try:
            result["value"] = call(*args, **kwargs)
        except BaseException as error:  # noqa: BLE001 - checked by the test
            result["error"] = error

    thread = threading.Thread(target=target)
    thread.start()
    return thread, result


def test_the_manifest_is_not_written_by_a_run_that_lost_its_claim_and_discards_take_the_claim_first(
        demo_root, tmp_path, monkeypatch):
    cfg = parse_config(demo_config_dict(demo_root, tmp_path / "artifacts"))
    made = execute.run_stage(cfg, "dataset", {})
    artifact, root = made.artifact, Path(cfg.artifacts_root)
    parts = key_parts(cfg, "dataset", {}, fingerprinter_for(root))
    claim = root / "dataset" / "_claims" / f"{artifact.key}.claim"
    other = Claims(root / "dataset", lease_seconds=LEASE, renew_seconds=RENEW, host_id="host-b")

    def held_meanwhile(call, *args, **kwargs):
        """Run `call` while host-b holds the artifact's claim: it must wait (and not touch the folder)."""
        assert other.acquire(artifact.key)
        thread, result = _in_thread(call, *args, **kwargs)
        time.sleep(0.5)
        assert thread.is_alive() and (artifact.path / MANIFEST).is_file(), result
        other.release_all()
        thread.join(timeout=60)
        assert not thread.is_alive() and "error" not in result, result
        return result["value"]

    # --force waits for the run holding the claim before it discards the folder.
    assert not held_meanwhile(execute.run_stage, cfg, "dataset", {}, force=True).cache_hit
    assert not held_meanwhile(execute.prepare_stage, cfg, "dataset", parts, True)  # the Prefect flow's discard
    assert not execute.run_stage(cfg, "dataset", {}).cache_hit
    # A damaged non-sharded artifact is discarded whole: under its claim too.
    damaged = next(p for p in artifact.path.glob("*.parquet"))
    damaged.write_bytes(damaged.read_bytes() + b"junk")
    assert not held_meanwhile(execute.run_stage, cfg, "dataset", {}).cache_hit
    # leccr gc keeps an artifact whose claim a live run holds, and takes over a dead run's claim.
    garbage = [Garbage(artifact, 0, True, False)]
    assert other.acquire(artifact.key)
    assert delete(root, garbage) == [] and (artifact.path / MANIFEST).is_file()
    other.release_all()
    _dead_claim(root / "dataset", artifact.key, seconds_ago=600.0)  # past the default lease
    assert delete(root, garbage) == garbage and not artifact.path.exists() and not claim.exists()

    # A run whose claim another host took over while it computed writes no manifest.
    real_get_stage = execute.get_stage

    def taken_over_while_running(ctx):
        real_get_stage("dataset").run(ctx)
        _last_renewed(claim, 10.0)
        assert other.acquire(artifact.key)

    monkeypatch.setattr(execute, "get_stage", lambda name: dataclasses.replace(
        real_get_stage(name), run=taken_over_while_running) if name == "dataset" else real_get_stage(name))
    with pytest.raises(ClaimLost, match=r"dataset: the manifest is not written by this run"):
        execute.run_stage(cfg, "dataset", {}, logger=logging.getLogger("test"), parts=parts)
    assert artifact.path.is_dir() and not (artifact.path / MANIFEST).exists()
    assert _held_by(claim) == "host-b"
    other.release_all()
