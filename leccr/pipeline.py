"""Run stages through the store: key, cache check, run, manifest. Plain Python, no Prefect.

`flows/leccr.py` wraps `run_stage` as a Prefect task; tests, scripts and the CLI's no-op and dry-run
paths call `run_pipeline` / `explain` directly. All of them take the same decisions, because all go
through `plan`, `key_parts` and `run_stage`.

The stage contract (`Stage`): a module of the `stages` package with `UPSTREAM`, `section(cfg)` and
`run(ctx)`, and optionally `SHARDED`, `key_config(cfg, fingerprints)` (extra facts its key needs, such
as resolved model configs) and `CONFIG_SECTION` (the experiment-file section its fields come from,
when it is not the stage's name). The order of the DAG comes from `UPSTREAM` alone.
"""
from __future__ import annotations

import functools
import importlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from leccr.codeid import code_digest, code_modules
from leccr.config import ExperimentConfig, Section
from leccr.fingerprint import Fingerprinter, fingerprinter_for
from leccr.stage_order import declared_upstream, stage_order
from leccr.store import (STORE_FORMAT, Artifact, KeyParts, StageContext, StageFailed, Store, atomic_write_text,
                         changed_failures, reopen_for_retry, resolve_section, stage_lock, write_manifest)

log = logging.getLogger(__name__)

STAGES_PACKAGE = "stages"


class Stage(Protocol):
    """What a module of the `stages` package provides (modules satisfy protocols, PEP 544)."""

    UPSTREAM: tuple[str, ...]  # the stages whose artifacts `run` reads, by name
    # Optional READS: {upstream stage: the files of its artifact `run` reads}, when that is fewer than
    # all: the key then hashes those files only (translate reads the dataset's captions, not its media
    # record). Without it the key hashes each upstream artifact's whole content.

    def section(self, cfg: ExperimentConfig) -> Section:
        """The stage's config section, as the stage will use it."""

    def run(self, ctx: StageContext) -> None:
        """Compute the artifact into `ctx.out_dir` (the pipeline writes the manifest afterwards)."""


class UnknownStage(ValueError):
    """A stage name that is not a stage of this pipeline."""


@dataclass(frozen=True)
class StageSpec:
    """One stage of the DAG: its module and what the pipeline needs to know of it."""

    name: str
    module: Any  # a Stage module

    @property
    def upstream(self) -> tuple[str, ...]:
        return tuple(self.module.UPSTREAM)

    @property
    def sharded(self) -> bool:
        """Whether the stage writes shards that several tasks can compute side by side."""
        return bool(getattr(self.module, "SHARDED", False))

    @property
    def reads(self) -> dict[str, tuple[str, ...]]:
        return dict(getattr(self.module, "READS", {}))

    @property
    def config_section(self) -> str:
        return getattr(self.module, "CONFIG_SECTION", self.name)

    @functools.cached_property
    def code_modules(self) -> dict[str, str]:
        """{module: digest} of every project module the stage runs (leccr.codeid)."""
        return code_modules(self.module.__name__)

    @property
    def code(self) -> str:
        return code_digest(self.module.__name__)

    def section(self, cfg: ExperimentConfig) -> Section:
        return self.module.section(cfg)

    def key_config(self, cfg: ExperimentConfig, fingerprints: Fingerprinter) -> dict[str, Any]:
        """The section as the stage really uses it, plus whatever else the stage says its output depends on."""
        config = resolve_section(self.section(cfg), fingerprints)
        extra = getattr(self.module, "key_config", None)
        return config | extra(cfg, fingerprints) if extra is not None else config


@functools.lru_cache(maxsize=1)
def _stages() -> dict[str, StageSpec]:
    upstream = declared_upstream()
    specs = {}
    for name in stage_order(upstream):
        module = importlib.import_module(f"{STAGES_PACKAGE}.{name}")
        if tuple(module.UPSTREAM) != upstream[name]:
            raise RuntimeError(f"stage {name!r}: UPSTREAM {module.UPSTREAM} is not the literal {upstream[name]}")
        specs[name] = StageSpec(name, module)
    return specs


def stage_names() -> tuple[str, ...]:
    """Every stage of the DAG, upstream before downstream."""
    return tuple(_stages())


def get_stage(name: str) -> StageSpec:
    try:
        return _stages()[name]
    except KeyError:
        raise UnknownStage(f"unknown stage {name!r}; the stages are: {', '.join(stage_names())}") from None


def upstream_of(name: str) -> tuple[str, ...]:
    return get_stage(name).upstream


def is_sharded(name: str) -> bool:
    return get_stage(name).sharded


def check_stage_names(names: list[str]) -> None:
    """Raise UnknownStage naming the valid stages if any name is not a stage."""
    for name in names:
        get_stage(name)


@dataclass(frozen=True)
class Plan:
    """Which stages run, in order, and which of them are forced to recompute."""

    order: tuple[str, ...]
    forced: frozenset[str]


def plan(stages: list[str] | None = None, force: list[str] | None = None) -> Plan:
    """Stages to run: the requested ones (default: all) and everything they need upstream.

    Forcing a stage also forces everything downstream of it that runs.
    """
    check_stage_names(list(stages or []) + list(force or []))
    wanted = set(stages or stage_names())
    for name in reversed(stage_names()):  # add upstream closure
        if name in wanted:
            wanted.update(upstream_of(name))
    order = tuple(name for name in stage_names() if name in wanted)
    forced = set(force or [])
    for name in order:
        if any(up in forced for up in upstream_of(name)):
            forced.add(name)
    return Plan(order, frozenset(forced & set(order)))


# ------------------------------------------------------------------------------------- keys and reasons
def key_parts(cfg: ExperimentConfig, name: str, inputs: dict[str, Artifact], fingerprints: Fingerprinter) -> KeyParts:
    """What stage `name`'s key hashes, given its finished upstream artifacts."""
    spec = get_stage(name)
    missing = [up for up in spec.upstream if up not in inputs]
    if missing:
        raise ValueError(f"stage {name!r} needs upstream artifact(s) {missing}")
    return KeyParts(stage=name, code=spec.code, config=spec.key_config(cfg, fingerprints),
                    upstream={up: (inputs[up].digest_of(spec.reads[up]) if up in spec.reads
                                   else inputs[up].content_digest) for up in spec.upstream},
                    code_modules=spec.code_modules)


def previous_manifest(store: Store, experiment: str, name: str) -> dict[str, Any] | None:
    """The manifest of the artifact this experiment last used for a stage (else the stage's latest)."""
    record = store.root / "runs" / f"{experiment}.json"
    if record.is_file():
        key = json.loads(record.read_text(encoding="utf-8")).get(name)
        if key is not None and store.is_complete(artifact := store.artifact(name, key)):
            return artifact.manifest
    latest = store.latest(name)
    return latest.manifest if latest is not None else None


def _flatten(data: Any, prefix: str) -> dict[str, Any]:
    if isinstance(data, dict) and data and "content" not in data:  # {"content": ...}: one path, a leaf
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}"))
        return out
    return {prefix: data}


def _show(value: Any) -> str:
    return "(unset)" if value is _ABSENT else json.dumps(value, ensure_ascii=False, default=str)


_ABSENT = object()


def why_new(parts: KeyParts, previous: dict[str, Any] | None, config_section: str) -> list[str]:
    """Why a key differs from the previous artifact's: changed fields, content, code or upstream."""
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
    for dotted in sorted(set(old) | set(new)):
        before, after = old.get(dotted, _ABSENT), new.get(dotted, _ABSENT)
        if before == after:
            continue
        if isinstance(before, dict) and isinstance(after, dict):  # {"content": digest, ...} on both sides
            reasons.append(f"{dotted}: content changed")
        else:
            reasons.append(f"{dotted}: {_show(before)} → {_show(after)}")
    before_up = previous.get("upstream_digests", {})
    for up, digest in sorted(parts.upstream.items()):
        if before_up.get(up) != digest:
            reasons.append(f"upstream {up} changed")
    return reasons or ["key changed"]


@dataclass
class PlannedStage:
    """One stage of `explain`: its key (None while an upstream stage must run first), status, reasons."""

    name: str
    status: str  # hit | miss | forced | pending
    key: str | None = None
    reasons: list[str] = field(default_factory=list)

    def line(self) -> str:
        key = self.key or "-" * 16
        text = f"{self.name:<9} {key}  {self.status}"
        return text + (": " + "; ".join(self.reasons) if self.reasons else "")


def explain(cfg: ExperimentConfig, stages: list[str] | None = None, force: list[str] | None = None,
            fingerprints: Fingerprinter | None = None) -> list[PlannedStage]:
    """What a run would do, stage by stage, without running anything (`leccr run --dry-run`)."""
    the_plan = plan(stages, force)
    store = Store(cfg.artifacts_root)
    fingerprints = fingerprints or fingerprinter_for(cfg.artifacts_root)
    planned: dict[str, PlannedStage] = {}
    finished: dict[str, Artifact] = {}
    for name in the_plan.order:
        waiting = [up for up in upstream_of(name) if up not in finished]
        if waiting:
            # The key needs what the upstream stages will hold; this stage's own changes show already.
            spec = get_stage(name)
            previous = previous_manifest(store, cfg.name, name)
            own = KeyParts(name, spec.code, spec.key_config(cfg, fingerprints),
                           (previous or {}).get("upstream_digests", {}), spec.code_modules)
            reasons = [r for r in why_new(own, previous, spec.config_section) if r != "key changed"]
            planned[name] = PlannedStage(name, "pending", reasons=[f"after {', '.join(waiting)}", *reasons])
            continue
        parts = key_parts(cfg, name, finished, fingerprints)
        artifact = store.artifact(name, parts.key)
        if name in the_plan.forced:
            planned[name] = PlannedStage(name, "forced", parts.key, ["--force"])
        elif store.is_complete(artifact) and (changed := changed_failures(artifact.path, Path(cfg.dataset.path))):
            planned[name] = PlannedStage(name, "miss", parts.key,
                                         [f"retries failed items: {changed} have a changed file since they failed"])
        elif store.is_complete(artifact):
            planned[name] = PlannedStage(name, "hit", parts.key)
            finished[name] = artifact
        else:
            reasons = why_new(parts, previous_manifest(store, cfg.name, name), get_stage(name).config_section)
            shards = len(list(artifact.path.rglob("part-*.parquet"))) if artifact.path.is_dir() else 0
            if shards:
                reasons.append(f"resumes with {shards} finished shard(s)")
            planned[name] = PlannedStage(name, "miss", parts.key, reasons)
    return list(planned.values())


# ------------------------------------------------------------------------------------- running
@dataclass(frozen=True)
class StageOutcome:
    """What a stage task returns: a small handle, never the data."""

    artifact: Artifact
    cache_hit: bool
    seconds: float
    rows: dict[str, int]
    errors: int

    @property
    def output_rows(self) -> int:
        """Rows of the artifact's output tables (error rows are not output)."""
        return sum(n for name, n in self.rows.items() if not _is_error_file(name))

    def describe(self) -> str:
        state = "cache hit, no work" if self.cache_hit else f"computed in {self.seconds:.1f}s"
        return (f"{self.artifact.stage:<9} {state:<22} rows={self.output_rows:<7} errors={self.errors:<4} "
                f"{self.artifact.path}")


def _is_error_file(name: str) -> bool:
    """errors.parquet and the per-shard `_errors/part-*` files it merges: error rows, not output rows."""
    return name.endswith("errors.parquet") or "_errors/" in name


def prepare_stage(cfg: ExperimentConfig, name: str, parts: KeyParts, force: bool,
                  logger: logging.Logger | logging.LoggerAdapter | None = None) -> bool:
    """Discard a forced stage's folder before any shard task starts; True when already complete."""
    store = Store(cfg.artifacts_root)
    artifact = store.artifact(name, parts.key)
    if force:
        (logger or log).info("%s: --force: discarding %s", name, artifact.path)
        store.discard(artifact)
    reopen_for_retry(artifact.path, Path(cfg.dataset.path), logger or log, name)
    return store.is_complete(artifact)


def _context(cfg: ExperimentConfig, name: str, inputs: dict[str, Artifact], parts: KeyParts, artifact: Artifact,
             logger: logging.Logger | logging.LoggerAdapter, shard_slot: tuple[int, int] | None = None) -> StageContext:
    spec = get_stage(name)
    return StageContext(stage=name, key=parts.key, section=spec.section(cfg),
                        inputs={up: inputs[up] for up in spec.upstream}, out_dir=artifact.path, log=logger,
                        key_parts=parts, shard_slot=shard_slot, dataset_root=Path(cfg.dataset.path))


def run_stage_slot(cfg: ExperimentConfig, name: str, inputs: dict[str, Artifact], parts: KeyParts, slot: int,
                   slots: int, logger: logging.Logger | logging.LoggerAdapter | None = None) -> int:
    """Compute this slot's share of a sharded stage's shards (index % slots == slot); no manifest.

    Returns the number of shards this call committed. `run_stage` afterwards finds every shard
    committed, merges the errors and writes the manifest.
    """
    logger = logger or logging.getLogger(f"leccr.stages.{name}")
    store = Store(cfg.artifacts_root)
    artifact = store.artifact(name, parts.key)
    if store.is_complete(artifact):
        return 0
    artifact.path.mkdir(parents=True, exist_ok=True)
    before = set(artifact.path.rglob("part-*.parquet"))
    with stage_lock(artifact.path):
        get_stage(name).module.run(_context(cfg, name, inputs, parts, artifact, logger, (slot, slots)))
    return len(set(artifact.path.rglob("part-*.parquet")) - before)


def run_stage(cfg: ExperimentConfig, name: str, inputs: dict[str, Artifact], force: bool = False,
              logger: logging.Logger | logging.LoggerAdapter | None = None, parts: KeyParts | None = None
              ) -> StageOutcome:
    """Run one stage through the store: a cache hit does no work; otherwise run, then write the manifest.

    `parts` is the stage's key as the caller computed it (the flow computes keys once, in its driver);
    None computes it here.
    """
    logger = logger or logging.getLogger(f"leccr.stages.{name}")
    store = Store(cfg.artifacts_root)
    parts = parts or key_parts(cfg, name, inputs, fingerprinter_for(cfg.artifacts_root))
    artifact = store.artifact(name, parts.key)
    if force:
        logger.info("%s: --force: discarding %s", name, artifact.path)
        store.discard(artifact)
    reopen_for_retry(artifact.path, Path(cfg.dataset.path), logger, name)  # fixed files to retry: not a hit
    if store.is_complete(artifact):
        store.mark_latest(artifact)
        outcome = _outcome(artifact, cache_hit=True, seconds=0.0)
        logger.info("%s", outcome.describe())
        return outcome
    reasons = ["--force"] if force else why_new(parts, previous_manifest(store, cfg.name, name),
                                                get_stage(name).config_section)
    logger.info("%s: computing %s (%s)", name, parts.key, "; ".join(reasons))
    artifact.path.mkdir(parents=True, exist_ok=True)
    ctx = _context(cfg, name, inputs, parts, artifact, logger)
    started = time.time()
    with stage_lock(artifact.path):
        try:
            get_stage(name).module.run(ctx)
        except StageFailed:
            raise
        except Exception as error:  # add where the partial work is; the original traceback stays chained
            raise StageFailed(
                f"stage {name} failed: {type(error).__name__}: {error}. Finished shards are kept in "
                f"{artifact.path}; a rerun resumes from them."
            ) from error
        write_manifest(ctx, started)
    store.mark_latest(artifact)
    outcome = _outcome(artifact, cache_hit=False, seconds=time.time() - started)
    logger.info("%s", outcome.describe())
    return outcome


def _outcome(artifact: Artifact, cache_hit: bool, seconds: float) -> StageOutcome:
    manifest = artifact.manifest
    errors = sum(n for file, n in manifest["rows"].items() if file.endswith("errors.parquet"))
    return StageOutcome(artifact, cache_hit, seconds, manifest["rows"], errors)


def record_run(cfg: ExperimentConfig, outcomes: dict[str, StageOutcome]) -> Path:
    """Remember which artifact each stage of this experiment used last (read by `leccr inspect`, `gc`)."""
    path = Path(cfg.artifacts_root) / "runs" / f"{cfg.name}.json"
    previous: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    previous.update({name: outcome.artifact.key for name, outcome in outcomes.items()})
    atomic_write_text(path, json.dumps(previous, indent=2, sort_keys=True) + "\n")
    return path


def run_pipeline(
    cfg: ExperimentConfig, stages: list[str] | None = None, force: list[str] | None = None,
    fingerprints: Fingerprinter | None = None,
) -> dict[str, StageOutcome]:
    """Run the DAG in this process, stage after stage (the Prefect flow does the same as tasks)."""
    from leccr.runs import RunLabel, entries_of, now, write_record

    the_plan = plan(stages, force)
    fingerprints = fingerprints or fingerprinter_for(cfg.artifacts_root)
    outcomes: dict[str, StageOutcome] = {}
    started = now()
    try:
        for name in the_plan.order:
            inputs = {up: outcomes[up].artifact for up in upstream_of(name)}
            parts = key_parts(cfg, name, inputs, fingerprints)
            outcomes[name] = run_stage(cfg, name, inputs, force=name in the_plan.forced, parts=parts)
    except BaseException as error:  # the failed run is kept too, with the stages it finished
        write_record(cfg, RunLabel(cfg.name), started, entries_of(outcomes), "failed", error)
        raise
    record_run(cfg, outcomes)
    write_record(cfg, RunLabel(cfg.name), started, entries_of(outcomes), "completed")
    return outcomes
