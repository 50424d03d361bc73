"""What a run would do, job by job, without running anything (`leccr run --dry-run`).

Each job is a hit, a miss (with its reasons: changed fields, content or code, upstream, damaged files or
bookkeeping, and for a per-item stage how many units it will compute and reuse), forced, or pending
until an upstream stage has run. The dataset stage is cheap: a dry run computes it into a scratch
folder, so everything downstream of a changed dataset is planned exactly.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from leccr.config import ExperimentConfig
from leccr.core.artifact import Artifact, MethodArtifacts, Store, damaged_files, read_manifest
from leccr.core.dag import Plan, get_stage, plan
from leccr.core.execute import make_context, run_stage
from leccr.core.failures import changed_failures
from leccr.core.fingerprint import Fingerprinter, fingerprinter_for
from leccr.core.jobs import (Input, Job, jobs_of, key_parts, parts_with_upstream, previous_manifest, version_drift,
                             why_new)
from leccr.core.keys import KeyParts

log = logging.getLogger(__name__)


@dataclass
class PlannedStage:
    """One job of `explain`: its key (None while an upstream stage must run first), status, reasons."""

    name: str  # the job's label: "describe", "train[leccr]"
    status: str  # hit | miss | forced | pending
    key: str | None = None
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def line(self) -> str:
        key = self.key or "-" * 16
        text = f"{self.name:<15} {key}  {self.status}"
        text += (": " + "; ".join(self.reasons) if self.reasons else "")
        return text + "".join(f"\n{'':<15} warning: {w}" for w in self.warnings)


def unreadable_records(folder: Path) -> list[str]:
    """The Parquet files of an unfinished artifact that cannot be read back (empty, cut): a resumed run
    computes their shards again."""
    from leccr.core.failures import unreadable

    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.rglob("*.parquet")):
        relative = path.relative_to(folder)
        if not any(part.startswith(".") for part in relative.parts) and (problem := unreadable(path)):
            found.append(f"{relative}: {problem}")
    return found


def _reuse_line(cfg: ExperimentConfig, job: Job, inputs: dict[str, Input], parts: KeyParts) -> str | None:
    """"3 of 1,000 items to compute, 997 reused" for a per-item stage that can reuse rows."""
    stage = get_stage(job.stage)
    if stage.shard_jobs is None:
        return None
    ctx = make_context(cfg, job, inputs, parts, log)
    if not ctx.memo_sources:
        return None
    counts = []
    for shard_job in stage.shard_jobs(ctx):
        split = ctx.plan_shards(shard_job)
        counts.append(f"{split.computed_units:,} of {len(shard_job.work):,} {shard_job.unit} to compute, "
                      f"{split.reused_units:,} reused")
    counts += [f"row memo: {note}" for note in ctx.memo_notes]
    return "; ".join(counts) if counts else None


def explain(cfg: ExperimentConfig, stages: list[str] | None = None, force: list[str] | None = None,
            fingerprints: Fingerprinter | None = None, preview: bool = True,
            every_field: bool = False) -> list[PlannedStage]:
    """What a run would do, job by job, without running anything (`leccr run --dry-run`).

    `preview`: compute a cheap stage that must run (the dataset) into a scratch folder, so the stages
    after it get keys and reasons too; without it they are pending. `every_field`: list every changed
    field (why_new)."""
    fingerprints = fingerprints or fingerprinter_for(cfg.artifacts_root)
    if not preview:
        return _explain(cfg, plan(stages, force), fingerprints, None, every_field)
    with tempfile.TemporaryDirectory(prefix="leccr-plan-") as scratch:
        return _explain(cfg, plan(stages, force), fingerprints, Path(scratch), every_field)


# A preview's log is not the run's: its "computed ... in /tmp/leccr-plan-..." would read as work done.
_PREVIEW_LOG = logging.getLogger("leccr.plan")
_PREVIEW_LOG.setLevel(logging.WARNING)


def _preview(cfg: ExperimentConfig, job: Job, scratch: Path, parts: KeyParts, fingerprints: Fingerprinter) -> Artifact:
    """Compute a cheap stage into a scratch store (never the real one) so the plan can see its output."""
    scratch_cfg = cfg.model_copy(update={"artifacts_root": str(scratch)})
    return run_stage(scratch_cfg, job, {}, logger=_PREVIEW_LOG, parts=parts, fingerprints=fingerprints).artifact


def _explain(cfg: ExperimentConfig, the_plan: Plan, fingerprints: Fingerprinter, scratch: Path | None,
             every_field: bool = False) -> list[PlannedStage]:
    store = Store(cfg.artifacts_root)
    planned: list[PlannedStage] = []
    finished: dict[str, Input] = {}
    for name in the_plan.order:
        stage = get_stage(name)
        waiting = [up for up in stage.upstream if up not in finished]
        done: dict[str, Artifact] = {}
        for job in jobs_of(cfg, name):
            previous = previous_manifest(store, cfg.name, job)
            if waiting:
                # The key needs what the upstream stages will hold; this stage's own changes show already.
                own = parts_with_upstream(cfg, job, fingerprints, (previous or {}).get("upstream_digests", {}))
                reasons = [r for r in why_new(own, previous, stage.config_section, every_field) if r != "key changed"]
                planned.append(PlannedStage(job.label, "pending", reasons=[f"after {', '.join(waiting)}", *reasons]))
                continue
            parts = key_parts(cfg, job, finished, fingerprints)
            artifact = store.artifact(name, parts.key)
            bookkeeping = read_manifest(artifact.path)[1] if store.is_complete(artifact) else None
            if name in the_plan.forced:
                planned.append(PlannedStage(job.label, "forced", parts.key, ["--force"]))
            elif bookkeeping is not None:
                planned.append(PlannedStage(job.label, "miss", parts.key, [bookkeeping, "recomputes it"]))
            elif store.is_complete(artifact) and (changed := changed_failures(artifact.path, Path(cfg.dataset.path))):
                planned.append(PlannedStage(job.label, "miss", parts.key,
                                            [f"retries failed items: {changed} have a changed file since they failed"]))
            elif store.is_complete(artifact) and (damaged := damaged_files(artifact.path, artifact.manifest,
                                                                            fingerprints)):
                planned.append(PlannedStage(job.label, "miss", parts.key,
                                            [*damaged.values(), "recomputes the damaged files"]))
            elif store.is_complete(artifact):
                planned.append(PlannedStage(job.label, "hit", parts.key,
                                            warnings=[f"made with other library versions: {', '.join(drift)}"]
                                            if (drift := version_drift(artifact.manifest)) else []))
                done[job.method or ""] = artifact
            else:
                reasons = why_new(parts, previous, stage.config_section, every_field)
                shards = len(list(artifact.path.rglob("part-*.parquet"))) if artifact.path.is_dir() else 0
                if shards:
                    reasons.append(f"resumes with {shards} finished shard(s)")
                reasons += [f"{problem}: recomputes that shard" for problem in unreadable_records(artifact.path)]
                reuse = _reuse_line(cfg, job, finished, parts)
                if reuse:
                    reasons.append(reuse)
                planned.append(PlannedStage(job.label, "miss", parts.key, reasons))
                if scratch is not None and stage.preview and not stage.upstream:
                    done[job.method or ""] = _preview(cfg, job, scratch, parts, fingerprints)
        if len(done) == len(jobs_of(cfg, name)):
            finished[name] = MethodArtifacts(name, done) if stage.per_method else done[""]
    return planned
