"""Every run kept: one JSON record per run under `<root>/runs/records/`, and DuckDB views over them.

`artifacts/runs/<name>.json` (leccr.pipeline.record_run) says which artifact each stage of an
experiment used *last*, and is overwritten by the next run. A record is never overwritten: each run
(a `leccr run`, the deployment, each variant of a sweep) writes a new file, named by its start time
and a random suffix, through a temporary name and a rename, so concurrent runs never clash and a
reader never sees half a record. A record holds the experiment, the sweep and variant (with the
swept values), start and end time, the effective config, every stage's key and whether this run
computed it, reused it from the store, or took it from another variant of its sweep, and the outcome.

    runs         one row per run: the swept fields as columns, the effective config as JSON
    run_metrics  every run's evaluate metrics (metrics.parquet) joined to its run

`leccr gc` keeps every artifact a record references (and their upstream), unless told to prune
records older than some age (`prune_records`).
"""
from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from leccr.core.io import atomic_write_text

RECORD_FORMAT = 1
RECORDS_DIR = ("runs", "records")

# How a run got each stage's artifact.
COMPUTED = "computed"  # this run computed it (a miss, or --force)
CACHE_HIT = "cache_hit"  # complete in the store before the run looked
SHARED = "shared"  # computed in this sweep by another variant with the same key (one task for both)


def records_dir(root: str | Path) -> Path:
    return Path(root).absolute().joinpath(*RECORDS_DIR)


def now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class RunLabel:
    """Where a run belongs: its experiment, and for a sweep's variant the sweep and the swept values."""

    experiment: str
    sweep: str | None = None
    variant: str | None = None
    swept: dict[str, Any] = field(default_factory=dict)  # dotted config path -> this variant's value


@dataclass(frozen=True)
class StageEntry:
    """One stage of a record: its artifact key and how the run got it."""

    key: str
    status: str  # COMPUTED | CACHE_HIT | SHARED
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "status": self.status, "seconds": round(self.seconds, 3)}


def entries_of(outcomes: Mapping[str, Any], shared: Iterable[str] = ()) -> dict[str, StageEntry]:
    """StageEntry per stage from `leccr.pipeline.StageOutcome`s; `shared`: stages whose task another
    variant of the sweep submitted (SHARED when that task computed the artifact)."""
    shared = set(shared)

    def status(name: str, outcome) -> str:
        if outcome.cache_hit:
            return CACHE_HIT
        return SHARED if name in shared else COMPUTED

    return {name: StageEntry(o.artifact.key, status(name, o), 0.0 if name in shared else o.seconds)
            for name, o in outcomes.items()}


def write_record(cfg, label: RunLabel, started: datetime, stages: Mapping[str, StageEntry], outcome: str,
                 error: BaseException | str | None = None, ended: datetime | None = None) -> Path:
    """Append one run's record (a new file, written atomically); returns its path.

    `cfg` is the run's effective ExperimentConfig (overrides and sweep values applied)."""
    ended = ended or now()
    run_id = f"{started.strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex[:8]}"
    record = {
        "record_format": RECORD_FORMAT,
        "run_id": run_id,
        "experiment": label.experiment,
        "name": cfg.name,
        "sweep": label.sweep,
        "variant": label.variant,
        "swept": label.swept,
        "started_at": started.isoformat(),
        "ended_at": ended.isoformat(),
        "seconds": round((ended - started).total_seconds(), 3),
        "outcome": outcome,
        "error": None if error is None else (error if isinstance(error, str) else f"{type(error).__name__}: {error}"),
        "stages": {name: entry.to_dict() for name, entry in stages.items()},
        "config": cfg.model_dump(mode="json"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    path = records_dir(cfg.artifacts_root) / f"{run_id}.json"
    atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    return path


def read_records(root: str | Path) -> list[dict[str, Any]]:
    """Every record under `root`, oldest first."""
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(records_dir(root).glob("*.json"))]


def prunable(root: str | Path, older_than: timedelta) -> list[Path]:
    """Record files of runs that ended longer ago than `older_than` (what `leccr gc --prune-runs` drops)."""
    limit = now() - older_than
    return [p for p in sorted(records_dir(root).glob("*.json"))
            if datetime.fromisoformat(json.loads(p.read_text(encoding="utf-8"))["ended_at"]) < limit]


def referenced_keys(root: str | Path, skip: Iterable[Path] = ()) -> list[tuple[str, str]]:
    """(stage, key) of every artifact a record references, except those of the records in `skip`."""
    skip = {Path(p).name for p in skip}
    keys = []
    for path in sorted(records_dir(root).glob("*.json")):
        if path.name not in skip:
            try:
                stages = json.loads(path.read_text(encoding="utf-8"))["stages"]
                keys.extend((stage, entry["key"]) for stage, entry in stages.items())
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                # What it references is unknown: stop rather than delete what it may keep.
                raise ValueError(f"run record {path} cannot be read ({type(error).__name__}: {error}); fix or "
                                 "delete it, then collect again") from None
    return keys


# ------------------------------------------------------------------------------------- DuckDB views
RECORD_COLUMNS = {  # the fixed columns of the `runs` view, as read from the JSON records
    "run_id": "VARCHAR", "experiment": "VARCHAR", "name": "VARCHAR", "sweep": "VARCHAR", "variant": "VARCHAR",
    "outcome": "VARCHAR", "error": "VARCHAR", "started_at": "VARCHAR", "ended_at": "VARCHAR", "seconds": "DOUBLE",
    "swept": "JSON", "stages": "JSON", "config": "JSON",
}


def _sql_type(values: list[Any]) -> str:
    """A DuckDB type that holds every value of one swept field (JSON text when they are not all scalars
    of one kind)."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return "BOOLEAN"
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return "DOUBLE"
    return "VARCHAR"


def swept_columns(records: list[dict[str, Any]], taken: Iterable[str] = ()) -> dict[str, str]:
    """{dotted path: column name} of every field any record swept: the path's last part when that is
    unique and clashes with no column in `taken` (`w_d`), else the whole path with `_` for dots."""
    paths = sorted({path for record in records for path in record.get("swept") or {}})
    taken = set(taken) | set(RECORD_COLUMNS)
    leaves = [p.rsplit(".", 1)[-1] for p in paths]
    return {p: leaf if leaves.count(leaf) == 1 and leaf not in taken else p.replace(".", "_")
            for p, leaf in zip(paths, leaves)}


def _quote(text: str) -> str:
    return text.replace("'", "''")


def view_statements(root: str | Path) -> list[str]:
    """CREATE VIEW statements of `runs` and `run_metrics` (none while no run has been recorded)."""
    from leccr.schemas.evaluate import METRICS

    folder = records_dir(root)
    records = read_records(root)
    if not records:
        return []
    columns = swept_columns(records, taken=METRICS.names + ["run_name", "evaluate_key"])
    swept_sql = "".join(
        f", TRY_CAST(swept->>'$.\"{_quote(path)}\"' AS "
        f"{_sql_type([r.get('swept', {}).get(path) for r in records])}) AS \"{column}\""
        for path, column in columns.items())
    json_columns = ", ".join(f"{name}: '{kind}'" for name, kind in RECORD_COLUMNS.items())
    glob = _quote((folder / "*.json").as_posix())
    statements = [
        "CREATE OR REPLACE VIEW runs AS SELECT run_id, experiment, name, sweep, variant, outcome, error, "
        "CAST(started_at AS TIMESTAMPTZ) AS started_at, CAST(ended_at AS TIMESTAMPTZ) AS ended_at, seconds"
        f"{swept_sql}, swept, stages, config "
        f"FROM read_json('{glob}', format = 'auto', columns = {{{json_columns}}})"
    ]
    evaluate_dir = Path(root).absolute() / "evaluate"
    if list(evaluate_dir.glob("*/metrics.parquet")):
        metrics_glob = _quote((evaluate_dir / "*" / "metrics.parquet").as_posix())
        swept_select = "".join(f', r."{column}"' for column in columns.values())
        statements.append(
            "CREATE OR REPLACE VIEW run_metrics AS SELECT r.run_id, r.experiment, r.name AS run_name, r.sweep, "
            f"r.variant, r.started_at{swept_select}, m.* EXCLUDE (filename) FROM runs r JOIN ("
            "SELECT *, regexp_extract(filename, '/evaluate/([^/]+)/metrics\\.parquet$', 1) AS evaluate_key "
            f"FROM read_parquet('{metrics_glob}', union_by_name = true, filename = true)) m "
            "ON m.evaluate_key = r.stages->>'$.evaluate.key'")
    return statements
