"""DuckDB over the artifact store: one view per stage output, for the latest run or one experiment."""
from __future__ import annotations

import json
from pathlib import Path

import duckdb

from leccr.store import Artifact, Store

# view name -> (stage, glob inside the stage's artifact folder). A view is created only when its
# files exist, so an experiment that skipped a stage still opens.
VIEWS: dict[str, tuple[str, str]] = {
    "items": ("dataset", "items.parquet"),
    "captions": ("dataset", "captions.parquet"),
    "translate": ("translate", "part-*.parquet"),
    "translate_errors": ("translate", "errors.parquet"),
    # DESCRIBE is an SQL keyword: the view is `"describe"` (quoted) and, for convenience, `descriptions`.
    "describe": ("describe", "part-*.parquet"),
    "descriptions": ("describe", "part-*.parquet"),
    "describe_errors": ("describe", "errors.parquet"),
    "visual_features": ("features", "visual/part-*.parquet"),
    "text_tokens": ("features", "text/part-*.parquet"),
    "description_features": ("features", "descriptions/part-*.parquet"),
    "features_errors": ("features", "*/errors.parquet"),
    "history": ("train", "*/history.parquet"),
    "metrics": ("evaluate", "metrics.parquet"),
    # One row per (method, indexed item): its global (and slot) embeddings; `index_items` holds captions.
    "index": ("index", "*/embeddings.parquet"),
    "index_items": ("index", "items.parquet"),
}


def selected_artifacts(root: str | Path, experiment: str | None = None) -> dict[str, Artifact]:
    """Artifacts of one experiment's last run (artifacts/runs/<name>.json), or each stage's latest."""
    store = Store(root)
    if experiment is not None:
        record = store.root / "runs" / f"{experiment}.json"
        if not record.is_file():
            known = sorted(p.stem for p in (store.root / "runs").glob("*.json"))
            raise FileNotFoundError(f"no run recorded for experiment {experiment!r} in {store.root}; known: {known}")
        keys = json.loads(record.read_text(encoding="utf-8"))
        return {stage: store.artifact(stage, key) for stage, key in keys.items()}
    stages = {stage for stage, _ in VIEWS.values()}
    return {stage: a for stage in sorted(stages) if (a := store.latest(stage)) is not None}


def view_statements(artifacts: dict[str, Artifact]) -> list[str]:
    statements = []
    for view, (stage, pattern) in VIEWS.items():
        artifact = artifacts.get(stage)
        if artifact is None or not list(artifact.path.glob(pattern)):
            continue
        glob = (artifact.path / pattern).as_posix().replace("'", "''")
        statements.append(
            f"CREATE OR REPLACE VIEW \"{view}\" AS SELECT * FROM read_parquet('{glob}', union_by_name=true)"
        )
    return statements


def connect(root: str | Path, experiment: str | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with one view per available artifact table."""
    con = duckdb.connect()
    for statement in view_statements(selected_artifacts(root, experiment)):
        con.execute(statement)
    return con


def list_views(con: duckdb.DuckDBPyConnection) -> list[str]:
    return [row[0] for row in con.execute(
        "SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY view_name").fetchall()]
