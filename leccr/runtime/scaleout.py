"""Scale-out checks: every Ray node must see the artifact root as the driver does.

Shard tasks write their shards straight into the store, so a worker on a node whose disk is not
the shared filesystem (NFS, Lustre, ...) would write shards nobody else sees. Before any stage runs,
the driver writes a probe file, one task pinned to each alive node reads it and writes an answer,
and the driver reads every answer back. Any failure stops the run with the node and the reason. The
tasks themselves are submitted by the flow (flows/pipeline.py): this module does not import Prefect.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

PROBE_DIR = ".storage-probe"


class SharedStorageError(RuntimeError):
    """A Ray node cannot see or write the artifact root."""


def answer_probe(root: str, token: str, node: str) -> str:
    """Run on a worker: read the driver's probe file, write this node's answer; returns the host name."""
    host = socket.gethostname()
    probe = Path(root) / PROBE_DIR / token
    try:
        seen = probe.read_text(encoding="utf-8")
    except OSError as error:
        raise SharedStorageError(
            f"node {node} ({host}, pid {os.getpid()}) cannot read the artifact root {root}: {error}. "
            "Put artifacts_root on a filesystem every Ray node mounts at the same path."
        ) from None
    if seen != token:
        raise SharedStorageError(f"node {node} ({host}) sees a different {probe}: expected {token!r}, read {seen!r}")
    answer = probe.with_name(f"{token}-{node}")
    try:
        answer.write_text(host, encoding="utf-8")
    except OSError as error:
        raise SharedStorageError(
            f"node {node} ({host}, pid {os.getpid()}) cannot write into the artifact root {root}: {error}. "
            "Every Ray node needs write access to artifacts_root."
        ) from None
    return host


def alive_nodes() -> list[str]:
    import ray

    return [n["NodeID"] for n in ray.nodes() if n.get("Alive")]


@contextlib.contextmanager
def probe_folder(root: str | Path, token: str) -> Iterator[Path]:
    """Write the driver's probe file under the artifact root; remove it (and the answers) afterwards."""
    folder = Path(root).absolute() / PROBE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / token).write_text(token, encoding="utf-8")
    try:
        yield folder
    finally:
        for path in folder.glob(f"{token}*"):
            path.unlink(missing_ok=True)
        if not any(folder.iterdir()):
            shutil.rmtree(folder, ignore_errors=True)


def check_answers(folder: Path, token: str, hosts: dict[str, str]) -> dict[str, str]:
    """After every node's probe task returned its host name: the driver must see each answer file."""
    for node, host in hosts.items():
        if not (folder / f"{token}-{node}").is_file():
            raise SharedStorageError(
                f"node {node} ({host}) wrote its probe answer, but the driver cannot see it under "
                f"{folder}: that node's {folder.parent} is a different filesystem."
            )
    return hosts
