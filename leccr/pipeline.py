"""Run stages through the store: key, cache check, run, manifest. Plain Python, no Prefect.

`flows/leccr.py` wraps `run_stage` as a Prefect task; tests and scripts can call `run_pipeline`
directly. Both take the same decisions, because both go through `plan` and `run_stage`.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from leccr.config import ExperimentConfig
from leccr.store import (Artifact, StageContext, StageFailed, Store, atomic_write_text, compute_key,
                         write_manifest)

log = logging.getLogger(__name__)

# Every stage of the DAG in topological order. A stage whose module does not exist yet is not run:
# nothing may pretend to be a stage it is not.
STAGE_ORDER = ("dataset", "translate", "describe", "features", "train", "evaluate")


def available_stages() -> list[str]:
    """Stages whose module exists and whose upstream stages are all available."""
    available: list[str] = []
    for name in STAGE_ORDER:
        if importlib.util.find_spec(f"stages.{name}") is None:
            continue
        upstream = importlib.import_module(f"stages.{name}").UPSTREAM
        if all(up in available for up in upstream):
            available.append(name)
    return available


def stage_module(name: str) -> ModuleType:
    if name not in STAGE_ORDER:
        raise ValueError(f"unknown stage {name!r}; stages are {list(STAGE_ORDER)}")
    if name not in available_stages():
        raise ValueError(f"stage {name!r} is not implemented in this version; available: {available_stages()}")
    return importlib.import_module(f"stages.{name}")


def upstream_of(name: str) -> tuple[str, ...]:
    return tuple(stage_module(name).UPSTREAM)


@dataclass(frozen=True)
class Plan:
    """Which stages run, in order, and which of them are forced to recompute."""

    order: tuple[str, ...]
    forced: frozenset[str]


def plan(stages: list[str] | None = None, force: list[str] | None = None) -> Plan:
    """Stages to run: the requested ones (default: all available) and everything they need upstream.

    Forcing a stage also forces everything downstream of it that runs, because a recomputed
    artifact may differ even under the same key (non-deterministic engines).
    """
    available = available_stages()
    for name in list(stages or []) + list(force or []):
        stage_module(name)  # raises a clear error for an unknown or missing stage
    wanted = set(stages or available)
    for name in reversed(STAGE_ORDER):  # add upstream closure
        if name in wanted:
            wanted.update(upstream_of(name))
    order = tuple(name for name in STAGE_ORDER if name in wanted)
    forced = set(force or [])
    for name in order:
        if any(up in forced for up in upstream_of(name)):
            forced.add(name)
    return Plan(order, frozenset(forced & set(order)))


def stage_key(cfg: ExperimentConfig, name: str, upstream_keys: dict[str, str]) -> str:
    module = stage_module(name)
    return compute_key(name, module.STAGE_VERSION, module.section(cfg), upstream_keys)


def resolve_keys(cfg: ExperimentConfig, stages: list[str] | None = None) -> dict[str, str]:
    """The key every stage would have for this config, without running anything."""
    keys: dict[str, str] = {}
    for name in plan(stages).order:
        keys[name] = stage_key(cfg, name, {up: keys[up] for up in upstream_of(name)})
    return keys


@dataclass(frozen=True)
class StageOutcome:
    """What a stage task returns: a small handle, never the data."""

    artifact: Artifact
    cache_hit: bool
    seconds: float
    rows: dict[str, int]
    errors: int

    def describe(self) -> str:
        state = "cache hit, no work" if self.cache_hit else f"computed in {self.seconds:.1f}s"
        total = sum(n for name, n in self.rows.items() if not name.endswith("errors.parquet"))
        return (f"{self.artifact.stage:<9} {state:<22} rows={total:<7} errors={self.errors:<4} "
                f"{self.artifact.path}")


def is_sharded(name: str) -> bool:
    """Whether a stage writes its output in shards that several tasks can compute side by side."""
    return bool(getattr(stage_module(name), "SHARDED", False))


def _locate(cfg: ExperimentConfig, name: str, inputs: dict[str, Artifact]) -> tuple[ModuleType, Store, Artifact]:
    module = stage_module(name)
    missing = [up for up in module.UPSTREAM if up not in inputs]
    if missing:
        raise ValueError(f"stage {name!r} needs upstream artifact(s) {missing}")
    store = Store(cfg.artifacts_root)
    key = compute_key(name, module.STAGE_VERSION, module.section(cfg), {up: inputs[up].key for up in module.UPSTREAM})
    return module, store, store.artifact(name, key)


def prepare_stage(cfg: ExperimentConfig, name: str, inputs: dict[str, Artifact], force: bool,
                  logger: logging.Logger | logging.LoggerAdapter | None = None) -> bool:
    """Discard a forced stage's folder before any shard task starts; True when already complete."""
    module, store, artifact = _locate(cfg, name, inputs)
    if force:
        (logger or log).info("%s: --force: discarding %s", name, artifact.path)
        _discard(module, store, artifact, cfg, inputs)
    return store.is_complete(artifact)


def _discard(module: ModuleType, store: Store, artifact: Artifact, cfg: ExperimentConfig,
             inputs: dict[str, Artifact]) -> None:
    store.discard(artifact)
    # A stage with caches of its own outside its folder (features' shared visual cache) drops them too.
    if hasattr(module, "discard_caches"):
        module.discard_caches(cfg, inputs)


def run_stage_slot(cfg: ExperimentConfig, name: str, inputs: dict[str, Artifact], slot: int, slots: int,
                   logger: logging.Logger | logging.LoggerAdapter | None = None) -> int:
    """Compute this slot's share of a sharded stage's shards (index % slots == slot); no manifest.

    Returns the number of shards this call committed. `run_stage` afterwards finds every shard
    committed, merges the errors and writes the manifest.
    """
    logger = logger or logging.getLogger(f"leccr.stages.{name}")
    module, store, artifact = _locate(cfg, name, inputs)
    if store.is_complete(artifact):
        return 0
    artifact.path.mkdir(parents=True, exist_ok=True)
    before = set(artifact.path.rglob("part-*.parquet"))
    ctx = StageContext(stage=name, key=artifact.key, section=module.section(cfg),
                       inputs={up: inputs[up] for up in module.UPSTREAM}, out_dir=artifact.path, log=logger,
                       shard_slot=(slot, slots))
    module.run(ctx)
    return len(set(artifact.path.rglob("part-*.parquet")) - before)


def run_stage(
    cfg: ExperimentConfig,
    name: str,
    inputs: dict[str, Artifact],
    force: bool = False,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
) -> StageOutcome:
    """Run one stage through the store: a cache hit does no work; otherwise run, then write the manifest."""
    logger = logger or logging.getLogger(f"leccr.stages.{name}")
    module, store, artifact = _locate(cfg, name, inputs)
    section, key = module.section(cfg), artifact.key
    if force:
        logger.info("%s: --force: discarding %s", name, artifact.path)
        _discard(module, store, artifact, cfg, inputs)
    if store.is_complete(artifact):
        store.mark_latest(artifact)
        outcome = _outcome(artifact, cache_hit=True, seconds=0.0)
        logger.info("%s", outcome.describe())
        return outcome
    artifact.path.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(stage=name, key=key, section=section,
                       inputs={up: inputs[up] for up in module.UPSTREAM},
                       out_dir=artifact.path, log=logger)
    logger.info("%-9s started (key %s)", name, key)  # the matching end line is outcome.describe()
    started = time.time()
    try:
        module.run(ctx)
    except StageFailed:
        raise
    except Exception as error:  # add where the partial work is; the original traceback stays chained
        raise StageFailed(
            f"stage {name} failed: {type(error).__name__}: {error}. Finished shards are kept in "
            f"{artifact.path}; a rerun resumes from them."
        ) from error
    write_manifest(ctx, module.STAGE_VERSION, started, extra={})
    store.mark_latest(artifact)
    outcome = _outcome(artifact, cache_hit=False, seconds=time.time() - started)
    logger.info("%s", outcome.describe())
    return outcome


def _outcome(artifact: Artifact, cache_hit: bool, seconds: float) -> StageOutcome:
    manifest = artifact.manifest
    errors = sum(n for file, n in manifest["rows"].items() if file.endswith("errors.parquet"))
    return StageOutcome(artifact, cache_hit, seconds, manifest["rows"], errors)


def record_run(cfg: ExperimentConfig, outcomes: dict[str, StageOutcome]) -> Path:
    """Remember which artifact each stage of this experiment used last (read by `leccr inspect`)."""
    path = Path(cfg.artifacts_root) / "runs" / f"{cfg.name}.json"
    previous: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    previous.update({name: outcome.artifact.key for name, outcome in outcomes.items()})
    atomic_write_text(path, json.dumps(previous, indent=2, sort_keys=True) + "\n")
    return path


def run_pipeline(
    cfg: ExperimentConfig, stages: list[str] | None = None, force: list[str] | None = None
) -> dict[str, StageOutcome]:
    """Run the DAG in this process, stage after stage (the Prefect flow does the same as tasks)."""
    the_plan = plan(stages, force)
    outcomes: dict[str, StageOutcome] = {}
    for name in the_plan.order:
        inputs = {up: outcomes[up].artifact for up in upstream_of(name)}
        outcomes[name] = run_stage(cfg, name, inputs, force=name in the_plan.forced)
    record_run(cfg, outcomes)
    return outcomes
