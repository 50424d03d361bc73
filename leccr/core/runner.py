"""Run stages through the store: key, cache check, run, manifest. Plain Python, no Prefect.

One driver (`drive_many`) serves `leccr run` in this process (leccr.core.local) and the Prefect flow
(leccr/flows/pipeline.py). Each only says how a job is submitted; both take the same decisions, because
both go through `plan`, `key_parts` and `run_stage`. A per-method stage (train) is one job, and one
artifact, per method.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from leccr.config import ExperimentConfig
from leccr.core.artifact import (MANIFEST, Artifact, Manifest, MethodArtifacts, ReadView, Store, damaged_files, held,
                                 library_versions, part_name, read_manifest, stage_lock, write_manifest)
from leccr.core.claims import Claims, artifact_claims
from leccr.core.codeid import code_modules
from leccr.core.context import StageContext
from leccr.core.dag import Plan, get_stage, plan
from leccr.core.failures import StageFailed, changed_failures, reopen_for_retry
from leccr.core.fingerprint import Fingerprinter, fingerprinter_for
from leccr.core.io import atomic_write_text
from leccr.core.keys import STORE_FORMAT, KeyParts, resolve_section
from leccr.core.stage import StageDef

log = logging.getLogger(__name__)

Input = Artifact | MethodArtifacts


# ------------------------------------------------------------------------------------- jobs
@dataclass(frozen=True)
class Job:
    """One artifact to make: a stage, or one method of a per-method stage."""

    stage: str
    method: str | None = None

    @property
    def label(self) -> str:
        return f"{self.stage}[{self.method}]" if self.method else self.stage

    @classmethod
    def from_label(cls, label: str) -> Job:
        stage, _, rest = label.partition("[")
        return cls(stage, rest[:-1] or None)


def as_job(job: Job | str) -> Job:
    """A stage name stands for its one job (tests and scripts run single stages by name)."""
    return Job(job) if isinstance(job, str) else job


def jobs_of(cfg: ExperimentConfig, name: str) -> list[Job]:
    if get_stage(name).per_method:
        return [Job(name, method) for method in cfg.train.methods]
    return [Job(name)]


def config_for(cfg: ExperimentConfig, job: Job) -> ExperimentConfig:
    """The experiment as one job sees it: a per-method job sees its own method only, so its key holds
    that method's model and nothing of the others'."""
    if job.method is None:
        return cfg
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"methods": [job.method]})})


def stage_code_modules(stage: StageDef, cfg: ExperimentConfig) -> dict[str, str]:
    """{module: digest} of every project module the configured stage runs (leccr.core.codeid)."""
    modules = dict(code_modules(stage.module))
    for extra in stage.code_for(cfg) if stage.code_for is not None else ():
        modules.update(code_modules(extra))
    return dict(sorted(modules.items()))


def _code_digest(modules: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{name}\0{digest}\n" for name, digest in modules.items()).encode()).hexdigest()


def key_parts(cfg: ExperimentConfig, job: Job | str, inputs: dict[str, Input], fingerprints: Fingerprinter) -> KeyParts:
    """What a job's key hashes, given its finished upstream artifacts."""
    job = as_job(job)
    stage = get_stage(job.stage)
    missing = [up for up in stage.upstream if up not in inputs]
    if missing:
        raise ValueError(f"stage {job.stage!r} needs upstream artifact(s) {missing}")
    return parts_with_upstream(cfg, job, fingerprints, {up: inputs[up].digest_of(stage.reads[up]) for up in stage.upstream})


def parts_with_upstream(cfg: ExperimentConfig, job: Job, fingerprints: Fingerprinter,
                        upstream: dict[str, str]) -> KeyParts:
    """A job's key parts around given upstream digests (a pending job in a dry run: the previous ones)."""
    stage = get_stage(job.stage)
    job_cfg = config_for(cfg, job)
    config = resolve_section(stage.section(job_cfg), fingerprints)
    if stage.key_config is not None:
        config |= stage.key_config(job_cfg, fingerprints)
    modules = stage_code_modules(stage, job_cfg)
    return KeyParts(stage=job.stage, code=_code_digest(modules), config=config, upstream=upstream,
                    code_modules=modules, salt_excludes=stage.memo_excludes)


# ------------------------------------------------------------------------------------- reasons
def previous_manifest(store: Store, experiment: str, job: Job) -> dict[str, Any] | None:
    """The manifest of the artifact this experiment last used for a job (else the stage's latest)."""
    record = store.root / "runs" / f"{experiment}.json"
    if record.is_file():
        key = json.loads(record.read_text(encoding="utf-8")).get(job.label)
        if key is not None and store.is_complete(artifact := store.artifact(job.stage, key)):
            return _raw_manifest(artifact)
    latest = store.latest(job.stage, job.method)
    return _raw_manifest(latest) if latest is not None else None


def _raw_manifest(artifact: Artifact) -> dict[str, Any] | None:
    try:
        return json.loads((artifact.path / "_manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _flatten(data: Any, prefix: str) -> dict[str, Any]:
    if isinstance(data, dict) and data and "content" not in data:  # {"content": ...}: one path, a leaf
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}"))
        return out
    return {prefix: data}


_ABSENT = object()
_SHOWN_CHARS = 60  # of a changed value, unless every field is asked for: a miss reads as one line
_BARE = re.compile(r"[\w.+\-/:@]+")


def _show(value: Any, whole: bool = True) -> str:
    """A key field's value as a reason shows it: a word-like string bare (`transformers`), anything else
    as JSON (`["train", "val"]`, `null`, `"two words"`), shortened to _SHOWN_CHARS unless `whole`."""
    if value is _ABSENT:
        return "(unset)"
    if isinstance(value, str) and _BARE.fullmatch(value) and value not in ("null", "true", "false"):
        try:
            float(value)
        except ValueError:
            text = value
        else:
            text = json.dumps(value)  # "1" stays a string
    elif isinstance(value, dict) and "content" in value and not whole:  # a content path's identity
        text = "(a path's content)"
    else:
        text = json.dumps(value, ensure_ascii=False, default=str)
    return text if whole or len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS - 1] + "…"


def _engine_fields(old: dict[str, Any], new: dict[str, Any], config_section: str) -> set[str]:
    """The fields that come and go with a switch of the section's engine (the fields one engine keys and
    the other does not), or none when the engine did not change."""
    engine = f"{config_section}.engine"
    if old.get(engine, _ABSENT) == new.get(engine, _ABSENT):
        return set()
    return {dotted for dotted in set(old) ^ set(new) if dotted != engine}


def why_new(parts: KeyParts, previous: dict[str, Any] | None, config_section: str,
            every_field: bool = False) -> list[str]:
    """Why a key differs from the previous artifact's: changed fields, content, code or upstream.

    An engine switch names itself (`describe.engine: transformers → import`) and counts the fields only
    one of the two engines uses instead of listing them; `every_field` lists them, with whole values."""
    if previous is None:
        return ["no earlier artifact of this stage"]
    reasons: list[str] = []
    if previous.get("store_format") != STORE_FORMAT:
        return [f"made by an older store format ({previous.get('store_format', '1')} → {STORE_FORMAT})"]
    if previous.get("code_digest") != parts.code:
        before, now = previous.get("code_modules", {}), parts.code_modules
        changed = sorted(m for m in set(before) | set(now) if before.get(m) != now.get(m))
        reasons.append("code changed" + (f": {', '.join(changed)}" if changed and before else ""))
    old = _flatten(previous.get("key_config") or {}, config_section)
    new = _flatten(parts.config, config_section)
    folded = set() if every_field else _engine_fields(old, new, config_section)
    for dotted in sorted(set(old) | set(new)):
        before, after = old.get(dotted, _ABSENT), new.get(dotted, _ABSENT)
        if before == after or dotted in folded:
            continue
        if isinstance(before, dict) and isinstance(after, dict):  # {"content": digest, ...} on both sides
            if before.get("content") != after.get("content"):
                reasons.append(f"{dotted}: content changed")
            if before.get("name") != after.get("name"):
                reasons.append(f"{dotted}: renamed {_show(before.get('name', _ABSENT))} → {_show(after.get('name', _ABSENT))}")
            if before.get("content") == after.get("content") and before.get("name") == after.get("name"):
                reasons.append(f"{dotted}: {_show(before)} → {_show(after)}")
        else:
            reasons.append(f"{dotted}: {_show(before, every_field)} → {_show(after, every_field)}")
            if folded and dotted == f"{config_section}.engine":
                reasons[-1] += f" (+{len(folded)} fields of one engine only; --dry-run -v lists them)"
    before_up = previous.get("upstream_digests", {})
    for up, digest in sorted(parts.upstream.items()):
        if before_up.get(up) != digest:
            reasons.append(f"upstream {up} changed")
    return reasons or ["key changed"]


def version_drift(manifest: Manifest) -> list[str]:
    """Libraries whose installed version differs from the one that made an artifact (a warning only:
    the key leaves versions out, or every upgrade would recompute everything)."""
    now = library_versions()
    return [f"{name} {manifest.versions.get(name)} → {now.get(name)}" for name in sorted(manifest.versions)
            if manifest.versions.get(name) != now.get(name)]


# ------------------------------------------------------------------------------------- contexts
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


# ------------------------------------------------------------------------------------- explain
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


# ------------------------------------------------------------------------------------- the driver
class Pending(Protocol):
    def result(self) -> StageOutcome: ...


@dataclass(frozen=True)
class Submission:
    """Everything a submitter needs to start one job."""

    cfg: ExperimentConfig  # the configuration it runs under (a sweep's variant)
    job: Job
    inputs: dict[str, Input]
    parts: KeyParts
    forced: bool
    will_compute: bool  # not complete yet (or forced): the job will load models


Submit = Callable[[Submission], Pending]


@dataclass
class RunResult:
    """What one configuration of a drive got: its outcomes by job label, the labels whose job another
    configuration submitted (a sweep's shared stages), and its first error (None: it completed)."""

    outcomes: dict[str, StageOutcome]
    shared: set[str]
    error: BaseException | None


def drive_many(cfgs: dict[str, ExperimentConfig], the_plan: Plan, submit: Submit,
               fingerprints: Fingerprinter | None = None) -> dict[str, RunResult]:
    """The driver: submit every planned job of every configuration as soon as its upstream stages have
    finished, stage by stage across the configurations; {name: RunResult}.

    Keys are computed here, once a job's upstream has finished (a key hashes what they hold). A key
    two configurations share (a sweep's unchanged stages) is submitted once and both wait for it.
    A configuration whose job fails stops there; the others go on. `submit` decides where a job runs
    (this thread, a Prefect task, a Ray worker)."""
    first = next(iter(cfgs.values()))
    fingerprints = fingerprints or fingerprinter_for(first.artifacts_root)
    store = Store(first.artifacts_root)
    submitted: dict[tuple[str, str], Pending] = {}
    owner: dict[tuple[str, str], str] = {}
    pending: dict[str, dict[str, dict[Job, Pending]]] = {name: {} for name in cfgs}
    keys: dict[str, dict[Job, str]] = {name: {} for name in cfgs}
    failed: dict[str, BaseException] = {}
    for stage_name in the_plan.order:  # topological: waiting here never blocks a stage that could start
        stage = get_stage(stage_name)
        for name, cfg in cfgs.items():
            if name in failed:
                continue
            try:
                inputs: dict[str, Input] = {}
                for up in stage.upstream:
                    results = {job: future.result() for job, future in pending[name][up].items()}
                    inputs[up] = (MethodArtifacts(up, {job.method: o.artifact for job, o in results.items()})
                                  if get_stage(up).per_method else next(iter(results.values())).artifact)
            except BaseException as error:  # noqa: BLE001 - an upstream job failed: this configuration stops
                failed[name] = error
                continue
            pending[name][stage_name] = {}
            for job in jobs_of(cfg, stage_name):
                parts = key_parts(cfg, job, inputs, fingerprints)
                ident = (stage_name, parts.key)
                if ident not in submitted:
                    forced = stage_name in the_plan.forced
                    will_compute = forced or not store.is_complete(store.artifact(stage_name, parts.key))
                    submitted[ident] = submit(Submission(cfg, job, inputs, parts, forced, will_compute))
                    owner[ident] = name
                pending[name][stage_name][job] = submitted[ident]
                keys[name][job] = parts.key
    results = {}
    for name in cfgs:
        outcomes, error = {}, failed.get(name)
        for jobs in pending[name].values():
            for job, future in jobs.items():
                try:
                    outcomes[job.label] = future.result()
                except BaseException as job_error:  # noqa: BLE001 - this configuration's failure
                    error = error or job_error
        shared = {job.label for job, key in keys[name].items() if owner[(job.stage, key)] != name}
        results[name] = RunResult(outcomes, shared, error)
    return results


def run_pipeline(cfg: ExperimentConfig, stages: list[str] | None = None, force: list[str] | None = None,
                 fingerprints: Fingerprinter | None = None) -> dict[str, StageOutcome]:
    """Run the DAG in this process, its jobs on threads (leccr.core.local), without Prefect: what
    `leccr run` does unless Prefect is asked for; the Prefect flow drives the same way, as tasks.
    Every run, completed or failed, appends its run record (leccr.runs)."""
    from leccr.core.local import drive_here
    from leccr.runs import RunLabel, entries_of, now, write_record

    fingerprints = fingerprints or fingerprinter_for(cfg.artifacts_root)
    started = now()
    result = drive_here({cfg.name: cfg}, plan(stages, force), fingerprints)[cfg.name]
    if result.error is not None:  # the failed run is kept too, with the jobs it finished
        write_record(cfg, RunLabel(cfg.name), started, entries_of(result.outcomes), "failed", result.error)
        raise result.error
    record_run(cfg, result.outcomes)
    write_record(cfg, RunLabel(cfg.name), started, entries_of(result.outcomes), "completed")
    return result.outcomes
