"""`leccr gc`: find and delete artifacts that no recorded run references.

Referenced: every artifact named in `<root>/runs/<experiment>.json` (what each experiment used last),
in a run record (`<root>/runs/records/`, leccr.records.runs: every run kept, sweeps' variants included, unless
`prune` names the records to drop), each stage's `LATEST` pointer (what `leccr inspect` opens), and,
through their manifests, every upstream artifact those were built from. Everything else is garbage, except a folder a running stage
holds (its `.lock`, see leccr.core.artifact.stage_lock), which is never touched.

An incomplete folder (no manifest) is listed too: it holds the finished shards of a stopped run, which
a rerun of the same config would resume from, so deleting it costs that work. A folder whose manifest
is damaged (empty, not JSON) is listed with what is wrong and never deleted: a run of its config names
it and recomputes it. Nothing upstream of a damaged referenced artifact is deleted either, since its
manifest no longer says which artifacts it was built from.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from leccr.core.artifact import MANIFEST, Artifact, Store, exclusive, is_locked, read_manifest, stage_of
from leccr.core.claims import artifact_claims
from leccr.records.runs import referenced_keys


@dataclass
class Garbage:
    artifact: Artifact
    bytes: int
    complete: bool
    in_use: bool
    damaged: str | None = None  # what is wrong with its manifest
    kept_for: str | None = None  # a damaged referenced artifact downstream of it

    @property
    def deletable(self) -> bool:
        return not (self.in_use or self.damaged or self.kept_for)

    @property
    def note(self) -> str:
        if self.in_use:
            return "in use by a running stage: kept"
        if self.damaged:
            return f"damaged ({self.damaged}): skipped; a run of its config recomputes it"
        if self.kept_for:
            return f"kept: upstream of {self.kept_for}, whose manifest is damaged"
        return "" if self.complete else "incomplete (finished shards of a stopped run)"


def folder_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def referenced(store: Store, prune: list[Path] | None = None,
               damaged: dict[tuple[str, str], str] | None = None) -> set[tuple[str, str]]:
    """(stage, key) of every artifact an experiment's latest run, a run record (but those in `prune`) or
    a LATEST pointer uses, with upstream. `damaged` collects the referenced ones whose manifest cannot
    be read (their upstream cannot be followed)."""
    pending: list[tuple[str, str]] = []
    for record in sorted((store.root / "runs").glob("*.json")):
        pending.extend(json.loads(record.read_text(encoding="utf-8")).items())
    pending.extend(referenced_keys(store.root, skip=prune or []))
    for pointer in [*store.root.glob("*/LATEST"), *store.root.glob("*/LATEST.*")]:
        pending.append((pointer.parent.name, pointer.read_text(encoding="utf-8").strip()))
    seen: set[tuple[str, str]] = set()
    while pending:
        label, key = pending.pop()
        stage = stage_of(label)  # "train[leccr]" in run records and manifests
        if (stage, key) in seen:
            continue
        seen.add((stage, key))
        folder = store.root / stage / key
        if (folder / MANIFEST).is_file():
            manifest, problem = read_manifest(folder)
            if manifest is None:
                if damaged is not None:
                    damaged[(stage, key)] = str(problem)
                continue
            pending.extend(manifest.upstream.items())
    return seen


def collect(root: str | Path, prune: list[Path] | None = None) -> list[Garbage]:
    """Every unreferenced artifact under `root`, with its size, whether complete, whether in use
    (`prune`: run records whose artifacts are no longer kept for them)."""
    from leccr.core.dag import declared_upstream

    store = Store(root)
    damaged_refs: dict[tuple[str, str], str] = {}
    keep = referenced(store, prune, damaged_refs)
    protected: dict[str, str] = {}  # stage -> the damaged referenced artifact it may be upstream of
    graph = declared_upstream()
    for stage, key in sorted(damaged_refs):
        pending = list(graph.get(stage, ()))
        while pending:
            up = pending.pop()
            if up not in protected:
                protected[up] = f"{stage}/{key}"
                pending.extend(graph.get(up, ()))
    found = []
    for artifact in store.artifacts():
        if (artifact.stage, artifact.key) in keep and (artifact.stage, artifact.key) not in damaged_refs:
            continue
        complete = store.is_complete(artifact)
        problem = read_manifest(artifact.path)[1] if complete else None
        found.append(Garbage(artifact, folder_size(artifact.path), complete, is_locked(artifact.path), problem,
                             protected.get(artifact.stage)))
    return found


def delete(root: str | Path, garbage: list[Garbage]) -> list[Garbage]:
    """Delete these artifacts (renamed away first) holding each one's claim; one a stage started holding
    meanwhile, or whose claim a live run holds (on any host), is kept. A dead run's claim is taken over."""
    store = Store(root)
    removed = []
    for entry in garbage:
        if not entry.artifact.path.is_dir():
            continue
        claims = artifact_claims(store.root, entry.artifact.stage)
        with exclusive(entry.artifact.path) as free:  # held while the folder is renamed away
            try:
                if free and claims.acquire(entry.artifact.key):
                    store.discard(entry.artifact, locked=True)
                    removed.append(entry)
            finally:
                claims.release_all()
    return removed
