"""Scale-out checks: every Ray node must see the artifact root as the driver does.

Shard tasks write their shards straight into the store, so a worker on a node whose disk is not
the shared filesystem (NFS, Lustre, ...) would write shards nobody else sees. Before any stage runs,
the driver writes a probe file, one task pinned to each alive node reads it and writes an answer,
and the driver reads every answer back. Any failure stops the run with the node and the reason.
"""
from __future__ import annotations

import os
import shutil
import socket
import uuid
from collections.abc import Callable
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


def check_shared_storage(root: str | Path, probe_task: Callable, nodes: list[str] | None = None) -> dict[str, str]:
    """Probe every alive Ray node (one Prefect task pinned to each); returns {node id: host name}.

    `probe_task` is the Prefect task wrapping `answer_probe`; it is passed in because this module,
    like every library module, does not import Prefect.
    """
    from prefect_ray.context import remote_options
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    root = Path(root).absolute()
    token = uuid.uuid4().hex
    probe_dir = root / PROBE_DIR
    probe_dir.mkdir(parents=True, exist_ok=True)
    (probe_dir / token).write_text(token, encoding="utf-8")
    try:
        futures = {}
        for node in nodes or alive_nodes():
            with remote_options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)):
                futures[node] = probe_task.submit(str(root), token, node)
        hosts = {}
        for node, future in futures.items():
            hosts[node] = future.result()
            if not (probe_dir / f"{token}-{node}").is_file():
                raise SharedStorageError(
                    f"node {node} ({hosts[node]}) wrote its probe answer, but the driver cannot see it under "
                    f"{probe_dir}: that node's {root} is a different filesystem."
                )
        return hosts
    finally:
        for path in probe_dir.glob(f"{token}*"):
            path.unlink(missing_ok=True)
        with_contents = any(probe_dir.iterdir())
        if not with_contents:
            shutil.rmtree(probe_dir, ignore_errors=True)
