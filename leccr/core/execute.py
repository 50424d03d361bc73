"""Run one job through the store: verify a hit, or claim, compute and write the manifest. No Prefect.

`run_stage` is what every submitter calls (a thread of this process, a Prefect task, a Ray worker):
a verified hit does no work; a damaged artifact is named and recomputed; otherwise the job's claim is
taken, the stage runs with its memo sources held, and the manifest is written last, only by the
claim's holder.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leccr.config import ExperimentConfig
from leccr.core.artifact import (MANIFEST, Artifact, MethodArtifacts, ReadView, Store, damaged_files, held,
                                 part_name, read_manifest, stage_lock, write_manifest)
from leccr.core.claims import Claims, artifact_claims
from leccr.core.context import StageContext
from leccr.core.dag import get_stage
from leccr.core.failures import StageFailed, reopen_for_retry
from leccr.core.fingerprint import Fingerprinter, fingerprinter_for
from leccr.core.io import atomic_write_text
from leccr.core.jobs import Input, Job, as_job, config_for, key_parts, previous_manifest, why_new
from leccr.core.keys import KeyParts
from leccr.core.stage import StageDef

log = logging.getLogger(__name__)


def _views(stage: StageDef, inputs: dict[str, Input]) -> dict[str, ReadView | MethodArtifacts]:
    return {up: inputs[up] if isinstance(inputs[up], MethodArtifacts) else ReadView(inputs[up], tuple(stage.reads[up]), stage.name)
            for up in stage.upstream}


def make_context(cfg: ExperimentConfig, job: Job, inputs: dict[str, Input], parts: KeyParts,
                 logger: logging.Logger | logging.LoggerAdapter, shard_slot: tuple[int, int] | None = None,
                 fingerprints: Fingerprinter | None = None) -> StageContext:
    stage = get_stage(job.stage)
    store = Store(cfg.artifacts_root)
    sources = [a for a in store.with_salt(job.stage, parts.memo_salt) if a.key != parts.key] if stage.sharded else []
    return StageContext(stage=job.stage, key=parts.key, section=stage.section(config_for(cfg, job)),
                        inputs=_views(stage, inputs), out_dir=store.artifact(job.stage, parts.key).path, log=logger,
                        key_parts=parts, shard_slot=shard_slot, dataset_root=Path(cfg.dataset.path),
                        variant=job.method, memo_sources=sources, fingerprinter=fingerprints)


@contextlib.contextmanager
def held_sources(ctx: StageContext) -> Iterator[StageContext]:
    """Hold the context's memo sources while the stage reads rows from them (a shared lock on each, as
    a running stage holds its own folder): `leccr gc` leaves them alone and a discard (`--force`, a
    damaged artifact) waits. A source discarded before it could be held is dropped."""
    with contextlib.ExitStack() as stack:
        ctx.memo_sources = [source for source in ctx.memo_sources if stack.enter_context(held(source.path))]
        yield ctx


# ------------------------------------------------------------------------------------- running
@dataclass(frozen=True)
class StageOutcome:
    """What a stage task returns: a small handle, never the data."""

    artifact: Artifact
    cache_hit: bool
    seconds: float
    rows: dict[str, int]
    errors: int
    label: str = ""

    @property
    def output_rows(self) -> int:
        """Rows of the artifact's output tables (error rows and bookkeeping files are not output)."""
        return sum(n for name, n in self.rows.items() if not _is_bookkeeping(name))

    def describe(self) -> str:
        state = "cache hit, no work" if self.cache_hit else f"computed in {self.seconds:.1f}s"
        return (f"{self.label or self.artifact.stage:<15} {state:<22} rows={self.output_rows:<7} "
                f"errors={self.errors:<4} {self.artifact.path}")


def _is_bookkeeping(name: str) -> bool:
    """errors.parquet, the per-shard `_errors/` files it merges and the row memo's `_inputs/` files."""
    return name.endswith("errors.parquet") or "_errors/" in name or "_inputs/" in name


def prepare_stage(cfg: ExperimentConfig, job: Job | str, parts: KeyParts, force: bool,
                  logger: logging.Logger | logging.LoggerAdapter | None = None) -> bool:
    """Discard a forced stage's folder before any shard task starts; True when already complete."""
    job = as_job(job)
    store = Store(cfg.artifacts_root)
    artifact = store.artifact(job.stage, parts.key)
    if force:
        _discard_claimed(store, artifact, logger or log, job.label)
    reopen_for_retry(artifact.path, Path(cfg.dataset.path), logger or log, job.label)
    return store.is_complete(artifact)


def run_stage_slot(cfg: ExperimentConfig, job: Job | str, inputs: dict[str, Input], parts: KeyParts, slot: int,
                   slots: int, logger: logging.Logger | logging.LoggerAdapter | None = None) -> int:
    """Compute this slot's share of a sharded stage's shards (index % slots == slot); no manifest.

    Returns the number of shards this call committed. `run_stage` afterwards finds every shard
    committed, merges the errors and writes the manifest.
    """
    job = as_job(job)
    logger = logger or logging.getLogger(f"leccr.stages.{job.stage}")
    store = Store(cfg.artifacts_root)
    artifact = store.artifact(job.stage, parts.key)
    if store.is_complete(artifact):
        return 0
    artifact.path.mkdir(parents=True, exist_ok=True)
    before = set(artifact.path.rglob("part-*.parquet"))
    with stage_lock(artifact.path), held_sources(make_context(cfg, job, inputs, parts, logger, (slot, slots))) as ctx:
        get_stage(job.stage).run(ctx)
    return len(set(artifact.path.rglob("part-*.parquet")) - before)


def run_stage(cfg: ExperimentConfig, job: Job | str, inputs: dict[str, Input], force: bool = False,
              logger: logging.Logger | logging.LoggerAdapter | None = None, parts: KeyParts | None = None,
              fingerprints: Fingerprinter | None = None) -> StageOutcome:
    """Run one job through the store: a cache hit does no work; otherwise run, then write the manifest.

    `parts` is the job's key as the caller computed it (the driver computes keys once); None
    computes it here.
    """
    job = as_job(job)
    logger = logger or logging.getLogger(f"leccr.stages.{job.stage}")
    store = Store(cfg.artifacts_root)
    fingerprints = fingerprints or fingerprinter_for(cfg.artifacts_root)
    parts = parts or key_parts(cfg, job, inputs, fingerprints)
    artifact = store.artifact(job.stage, parts.key)
    # One run makes an artifact; a concurrent run of the same key waits, then serves what it made (or
    # takes over when that run died: its claim is then stale).
    claims = artifact_claims(store.root, job.stage)
    waited = False
    try:
        if force:  # only the claim's holder discards: a run still making the folder is waited for
            claims.wait_acquire(parts.key, logger, f"{job.label}: --force")
            logger.info("%s: --force: discarding %s", job.label, artifact.path)
            store.discard(artifact)
        while True:
            reopen_for_retry(artifact.path, Path(cfg.dataset.path), logger, job.label)  # fixed files: not a hit
            damaged = reopen_damaged(artifact, fingerprints, logger, job.label, claims)
            if store.is_complete(artifact):
                return _served(store, artifact, job, logger)
            if claims.acquire(parts.key):
                break
            if not waited:
                logger.info("%s: another run is computing %s; waiting for it", job.label, parts.key)
                waited = True
            time.sleep(1.0)
        if store.is_complete(artifact):  # finished by the other run just before our claim
            return _served(store, artifact, job, logger)
        reasons = (["--force"] if force else damaged if damaged else
                   why_new(parts, previous_manifest(store, cfg.name, job), get_stage(job.stage).config_section))
        logger.info("%s: computing %s (%s)", job.label, parts.key, "; ".join(reasons))
        artifact.path.mkdir(parents=True, exist_ok=True)
        ctx = make_context(cfg, job, inputs, parts, logger, fingerprints=fingerprints)
        started = time.time()
        with stage_lock(artifact.path), held_sources(ctx):
            try:
                get_stage(job.stage).run(ctx)
            except StageFailed:
                raise
            except Exception as error:  # add where the partial work is; the original traceback stays chained
                raise StageFailed(
                    f"stage {job.label} failed: {type(error).__name__}: {error}. Finished shards are kept in "
                    f"{artifact.path}; a rerun resumes from them."
                ) from error
            write_manifest(ctx, started, fence=lambda: claims.check(
                parts.key, f"{job.label}: the manifest is not written by this run; the run holding the claim now "
                           f"finishes {artifact.path}, and a rerun serves its result."))
    finally:
        claims.release_all()
    store.mark_latest(artifact, job.method)
    outcome = _outcome(artifact, job, cache_hit=False, seconds=time.time() - started)
    logger.info("%s", outcome.describe())
    return outcome


def _discard_claimed(store: Store, artifact: Artifact, logger: logging.Logger | logging.LoggerAdapter,
                     label: str) -> None:
    """--force before the shard tasks start: discard the folder holding its claim (a run still making
    it is waited for, a dead one's claim taken over)."""
    claims = artifact_claims(store.root, artifact.stage)
    try:
        with claims.holding(artifact.key, logger, f"{label}: --force"):
            logger.info("%s: --force: discarding %s", label, artifact.path)
            store.discard(artifact)
    finally:
        claims.release_all()


def _served(store: Store, artifact: Artifact, job: Job, logger: logging.Logger | logging.LoggerAdapter) -> StageOutcome:
    store.mark_latest(artifact, job.method)
    outcome = _outcome(artifact, job, cache_hit=True, seconds=0.0)
    logger.info("%s", outcome.describe())
    return outcome


def reopen_damaged(artifact: Artifact, fingerprints: Fingerprinter, logger: logging.Logger | logging.LoggerAdapter,
                   label: str, claims: Claims | None = None) -> list[str]:
    """When files of a finished artifact are missing or damaged, make it unfinished again and say why.

    A sharded stage loses only the damaged shards (and their error and input records), which its
    rerun computes again; any other stage is recomputed whole. Either is done holding the artifact's
    claim (`claims`, else one taken here), so no other run reads or remakes the folder meanwhile."""
    store = Store(artifact.path.parents[1])
    if not store.is_complete(artifact):
        return []
    manifest = read_manifest(artifact.path)[0]
    if manifest is not None and not damaged_files(artifact.path, manifest, fingerprints):
        return []
    own = claims is None
    claims = claims or artifact_claims(store.root, artifact.stage)
    try:
        with claims.holding(artifact.key, logger, f"{label}: damaged files"):
            # Looked at again under the claim: a run that held it may have repaired the artifact meanwhile.
            return _reopen(store, artifact, fingerprints, logger, label) if store.is_complete(artifact) else []
    finally:
        if own:
            claims.release_all()


def _reopen(store: Store, artifact: Artifact, fingerprints: Fingerprinter,
            logger: logging.Logger | logging.LoggerAdapter, label: str) -> list[str]:
    sharded = get_stage(artifact.stage).sharded
    manifest, problem = read_manifest(artifact.path)
    if manifest is None:  # what it vouched for is unknown: shards are checked as after a crash, the rest redone
        logger.warning("%s: %s in %s; recomputing %s", label, problem, artifact.path,
                       "the shards that do not read back" if sharded else "the artifact")
        if sharded:
            (artifact.path / MANIFEST).unlink(missing_ok=True)
        else:
            store.discard(artifact)
        return [str(problem)]
    problems = damaged_files(artifact.path, manifest, fingerprints)
    if not problems:
        return []
    logger.warning("%s: %s; recomputing %s", label, "; ".join(problems.values()),
                   "the damaged shards" if sharded else "the artifact")
    if not sharded:
        store.discard(artifact)
        return list(problems.values())
    (artifact.path / MANIFEST).unlink(missing_ok=True)
    for name in problems:
        path = artifact.path / name
        path.unlink(missing_ok=True)
        if path.name.startswith(("part-", "inputs-")):  # a shard and its own records go together
            index = int(path.stem.split("-")[1])
            folder = path.parent.parent if path.parent.name in ("_errors", "_inputs") else path.parent
            for sibling in (folder / part_name(index), folder / "_errors" / part_name(index),
                            folder / "_inputs" / f"inputs-{index:05d}.parquet"):
                sibling.unlink(missing_ok=True)
    return list(problems.values())


def _outcome(artifact: Artifact, job: Job, cache_hit: bool, seconds: float) -> StageOutcome:
    manifest = artifact.manifest
    errors = sum(n for file, n in manifest.rows.items() if file.endswith("errors.parquet"))
    return StageOutcome(artifact, cache_hit, seconds, manifest.rows, errors, job.label)


def record_run(cfg: ExperimentConfig, outcomes: dict[str, StageOutcome]) -> Path:
    """Remember which artifact each job of this experiment used last (read by `leccr inspect`, `gc`)."""
    path = Path(cfg.artifacts_root) / "runs" / f"{cfg.name}.json"
    previous: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    previous.update({label: outcome.artifact.key for label, outcome in outcomes.items()})
    atomic_write_text(path, json.dumps(previous, indent=2, sort_keys=True) + "\n")
    return path
