"""`leccr sweep`: a grid over config fields, expanded into named runs that share what they can.

A sweep is the experiment file with a grid of `--set` paths (`--grid train.models.leccr.losses.w_d=[0.1,0.3]`,
or the file's `sweep:` block): every combination is a variant, a run of its own with its own effective
config (named `<experiment>--<variant>`). Nothing here decides reuse: a stage's key is a hash of what its
output depends on, so two variants that differ only in a train field get the same dataset, translate,
describe, visual and features keys, and the driver submits each distinct (stage, key) once, in this
process (`run_sweep`) or as the Prefect flow (flows/sweep.py). `--dry-run` shows that before
anything runs (`plan_sweep`): for a stage whose key waits on upstream work, the identity of what it will
compute is its code, its config as it uses it, and the identities of its upstream stages — equal
identities give equal keys.

Plain Python: no Prefect.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from leccr.config import ConfigError, ExperimentConfig, load_config
from leccr.core.dag import get_stage
from leccr.core.driver import RunResult
from leccr.core.explain import explain
from leccr.core.fingerprint import Fingerprinter, fingerprinter_for
from leccr.core.jobs import Job, parts_with_upstream


@dataclass(frozen=True)
class Variant:
    """One run of a sweep: its name, the values it sets, and its effective config."""

    name: str  # e.g. "w_d=0.1,num_slots=2"
    values: dict[str, Any]  # dotted config path -> value
    cfg: ExperimentConfig


@dataclass(frozen=True)
class Sweep:
    name: str
    experiment: str  # the experiment file's name
    grid: dict[str, list[Any]]
    variants: list[Variant]
    base: ExperimentConfig  # the file with the --set overrides, before any grid value


def parse_grid(pairs: list[str]) -> dict[str, list[Any]]:
    """`--grid PATH=[v1,v2]` options as {path: [values]} (values read as YAML, as `--set` reads them)."""
    grid: dict[str, list[Any]] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--grid expects PATH=[v1,v2,...], got {pair!r}")
        path, text = pair.split("=", 1)
        values = yaml.safe_load(text)
        if not isinstance(values, list) or not values:
            raise ConfigError(f"--grid {path}: expected a non-empty list such as [0.1,0.3], got {text!r}")
        grid[path] = values
    return grid


def short_labels(paths: list[str]) -> dict[str, str]:
    """Each path's last part where that is unique among `paths` (w_d), else the whole path."""
    leaves = [p.rsplit(".", 1)[-1] for p in paths]
    return {p: leaf if leaves.count(leaf) == 1 else p for p, leaf in zip(paths, leaves)}


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def variant_name(values: dict[str, Any], labels: dict[str, str]) -> str:
    return ",".join(f"{labels[path]}={_show(value)}" for path, value in values.items())


def _config_name(experiment: str, variant: str) -> str:
    """The variant's experiment name (its latest-run pointer, artifacts/runs/<name>.json): a file name."""
    return re.sub(r"[^A-Za-z0-9._=,+@-]", "_", f"{experiment}--{variant}")


def load_sweep(
    config: str | Path,
    grid: dict[str, list[Any]] | None = None,
    name: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> Sweep:
    """The sweep of an experiment file: `grid` (else the file's `sweep.grid`) over the file with `overrides`.

    Every variant's config is validated here, so a bad value fails before anything runs, naming it."""
    overrides = dict(overrides or {})
    base = load_config(config, overrides)
    block = base.sweep
    grid = dict(grid or (block.grid if block is not None else {}))
    if not grid:
        raise ConfigError(f"{config}: nothing to sweep: give --grid PATH=[v1,v2] or a `sweep: {{grid: ...}}` block")
    from leccr.config import SweepConfig

    SweepConfig(grid=grid)  # the same checks as the file's block
    labels = short_labels(list(grid))
    variants = []
    for combination in itertools.product(*grid.values()):
        values = dict(zip(grid, combination))
        label = variant_name(values, labels)
        cfg = load_config(config, overrides | values | {"name": _config_name(base.name, label)})
        variants.append(Variant(label, values, cfg))
    default = f"{base.name}-" + "+".join(labels.values())
    sweep_name = name or (block.name if block is not None and block.name else None) or default
    return Sweep(re.sub(r"[^A-Za-z0-9._=,+@-]", "_", sweep_name), base.name, grid, variants, base)


# ------------------------------------------------------------------------------------- --dry-run
@dataclass
class PlannedVariantStage:
    name: str
    status: str  # hit | miss | forced | pending (as leccr.core.explain.explain)
    key: str | None
    identity: str  # the key, or for a pending stage what its key will be made of
    reasons: list[str] = field(default_factory=list)


def _identity(cfg: ExperimentConfig, label: str, upstream: dict[str, str], fingerprints: Fingerprinter) -> str:
    """What a pending job's key will be made of: its own parts and the identities of its upstream jobs."""
    job = Job.from_label(label)
    own = parts_with_upstream(cfg, job, fingerprints, {})
    ups = [
        identity
        for up_label, identity in sorted(upstream.items())
        if Job.from_label(up_label).stage in get_stage(job.stage).upstream
    ]
    text = json.dumps([label, own.own_digest, ups], sort_keys=True, default=str)
    return "pending:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def plan_sweep(
    sweep: Sweep,
    stages: list[str] | None = None,
    force: list[str] | None = None,
    fingerprints: Fingerprinter | None = None,
) -> dict[str, list[PlannedVariantStage]]:
    """{variant: its stages as `explain` sees them, each with the identity shared variants have in common}."""
    fingerprints = fingerprints or fingerprinter_for(sweep.base.artifacts_root)
    planned: dict[str, list[PlannedVariantStage]] = {}
    for variant in sweep.variants:
        identities: dict[str, str] = {}
        rows = []
        for stage in explain(variant.cfg, stages, force, fingerprints):
            identity = stage.key or _identity(variant.cfg, stage.name, identities, fingerprints)
            if stage.status == "forced":  # forced once for the whole sweep, still one task per key
                identity = f"forced:{stage.key}"
            identities[stage.name] = identity
            rows.append(PlannedVariantStage(stage.name, stage.status, stage.key, identity, stage.reasons))
        planned[variant.name] = rows
    return planned


def dry_run_lines(sweep: Sweep, planned: dict[str, list[PlannedVariantStage]]) -> list[str]:
    """Per run: each stage's key (or that it waits), cached or to compute, and which other runs share it."""
    users: dict[tuple[str, str], list[str]] = {}
    for variant, rows in planned.items():
        for row in rows:
            users.setdefault((row.name, row.identity), []).append(variant)
    grid = " × ".join(f"{path}={_show(values)}" for path, values in sweep.grid.items())
    lines = [f"Sweep {sweep.name}: {len(sweep.variants)} runs of {sweep.experiment} over {grid}"]
    width = max((len(row.name) for rows in planned.values() for row in rows), default=9)  # train[baseline]
    for variant in sweep.variants:
        lines.append(f"  {variant.name}   ({variant.cfg.name})")
        for row in planned[variant.name]:
            others = [v for v in users[(row.name, row.identity)] if v != variant.name]
            if len(others) == len(sweep.variants) - 1 and others:
                shared = "shared by all runs"
            elif others:
                shared = "shared with " + "; ".join(others)
            else:
                shared = "this run only"
            key = row.key or "-" * 16
            state = (
                "cached"
                if row.status == "hit"
                else ("computes" if row.status != "pending" else "computes (after upstream)")
            )
            lines.append(f"    {row.name:<{width}} {key}  {state:<25} {shared}")
    todo = sorted({(row.name, row.identity) for rows in planned.values() for row in rows if row.status != "hit"})
    per_stage: dict[str, int] = {}
    for stage, _ in todo:
        per_stage[stage] = per_stage.get(stage, 0) + 1
    runs_of_each = sum(len(rows) for rows in planned.values())
    lines.append(
        f"{len(todo)} stage computation(s) for {runs_of_each} stage run(s)"
        + (": " + ", ".join(f"{s} ×{n}" for s, n in per_stage.items()) if per_stage else "")
        + f"; {len(users) - len(todo)} cached"
    )
    return lines


# ------------------------------------------------------------------------------------- running
def run_sweep(sweep: Sweep, stages: list[str] | None = None, force: list[str] | None = None) -> dict[str, str]:
    """Every variant in this process (leccr.core.local), through the one driver, which submits a key
    several variants share once; then their records and the comparison (`finish_sweep`)."""
    from leccr.core.dag import plan
    from leccr.core.local import drive_here
    from leccr.records.runs import now

    started = now()
    results = drive_here(
        {variant.name: variant.cfg for variant in sweep.variants},
        plan(stages, force),
        fingerprinter_for(sweep.base.artifacts_root),
    )
    status = record_sweep(sweep, results, started)
    sweep_comparison(sweep)
    raise_failures(sweep, status)
    return status


def record_sweep(sweep: Sweep, results: dict[str, RunResult], started: datetime) -> dict[str, str]:
    """Each variant's run record (leccr.records.runs: sweep, variant, swept values, stage keys with computed /
    cache_hit / shared); {variant: "completed" | "failed: ..."}."""
    from leccr.core.execute import record_run
    from leccr.records.runs import RunLabel, entries_of, write_record

    status = {}
    for variant in sweep.variants:
        result = results[variant.name]
        label = RunLabel(sweep.experiment, sweep.name, variant.name, variant.values)
        if result.error is None:
            record_run(variant.cfg, result.outcomes)
        write_record(
            variant.cfg,
            label,
            started,
            entries_of(result.outcomes, result.shared),
            "failed" if result.error else "completed",
            result.error,
        )
        status[variant.name] = (
            "completed" if result.error is None else f"failed: {type(result.error).__name__}: {result.error}"
        )
    return status


def sweep_comparison(sweep: Sweep) -> Path | None:
    """The sweep's comparison (leccr.evaluation.compare) written beside the artifacts; None when no run evaluated."""
    from leccr.evaluation.compare import build, default_out_dir, select_runs, write

    try:
        title, records = select_runs(sweep.base.artifacts_root, sweep=sweep.name)
    except ValueError:
        return None
    return write(build(sweep.base.artifacts_root, title, records), default_out_dir(sweep.base.artifacts_root, title))


def raise_failures(sweep: Sweep, status: dict[str, str]) -> None:
    """One error naming every failed run, raised after every other run finished and was recorded."""
    failures = {v: s for v, s in status.items() if s != "completed"}
    if failures:
        raise RuntimeError(
            f"{len(failures)} of {len(status)} runs of sweep {sweep.name} failed: "
            + "; ".join(f"{v}: {s}" for v, s in failures.items())
        )
