"""DuckDB over the artifact store: one view per stage output, for the latest run or one experiment.

`connect` returns a read-only session: after the views exist, DuckDB may read files under the
artifacts root only (`allowed_directories` + `enable_external_access = false`, then the configuration
is locked so SQL cannot undo it), and `check_read_only` refuses every statement but queries, so
`COPY ... TO`, `ATTACH`, `INSTALL` and chained writes never run.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import TextIO

from typing import TYPE_CHECKING

from leccr.core.artifact import Artifact, Store, stage_of

if TYPE_CHECKING:  # imported where a connection is made: finding an artifact (search) needs no DuckDB
    import duckdb

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
    # Every worst-ranked query with what was retrieved (report.md shows the worst 10 per language).
    "worst_queries": ("evaluate", "worst_queries.parquet"),
    # One row per (method, indexed item): its global (and slot) embeddings; `index_items` holds captions.
    "index": ("index", "*/embeddings.parquet"),
    "index_items": ("index", "items.parquet"),
}


def selected_artifacts(root: str | Path, experiment: str | None = None) -> dict[str, Artifact]:
    """{job label: artifact} of one experiment's last run (artifacts/runs/<name>.json), or each stage's
    latest (a per-method stage as one label per method: "train[leccr]")."""
    store = Store(root)
    if experiment is not None:
        record = store.root / "runs" / f"{experiment}.json"
        if not record.is_file():
            known = sorted(p.stem for p in (store.root / "runs").glob("*.json"))
            raise FileNotFoundError(f"no run recorded for experiment {experiment!r} in {store.root}; known: {known}")
        keys = json.loads(record.read_text(encoding="utf-8"))
        return {label: store.artifact(stage_of(label), key) for label, key in keys.items()}
    selected = {}
    for stage in sorted({stage for stage, _ in VIEWS.values()}):
        if (artifact := store.latest(stage)) is not None:
            selected[stage] = artifact
        selected.update({f"{stage}[{method}]": a for method, a in store.latest_methods(stage).items()})
    return selected


def view_statements(artifacts: dict[str, Artifact]) -> list[str]:
    statements = []
    for view, (stage, pattern) in VIEWS.items():
        globs = [(artifact.path / pattern).as_posix().replace("'", "''")
                 for label, artifact in sorted(artifacts.items())
                 if stage_of(label) == stage and list(artifact.path.glob(pattern))]
        if not globs:
            continue
        files = ", ".join(f"'{glob}'" for glob in globs)
        statements.append(
            f"CREATE OR REPLACE VIEW \"{view}\" AS SELECT * FROM read_parquet([{files}], union_by_name=true)"
        )
    return statements


# Statements that only read: SELECT, WITH, FROM, VALUES, DESCRIBE, SHOW, SUMMARIZE are all SELECT.
READ_ONLY_STATEMENTS = frozenset({"SELECT", "EXPLAIN"})  # names of duckdb.StatementType members


class ReadOnlyViolation(ValueError):
    """A statement that would write, attach, install or change settings: `leccr inspect` only reads."""


def lock_statements(root: str | Path) -> list[str]:
    """What makes a session read the artifacts root and nothing else (run after the views exist)."""
    folder = Path(root).absolute().as_posix().rstrip("/").replace("'", "''") + "/"
    return [f"SET allowed_directories = ['{folder}']", "SET enable_external_access = false",
            "SET lock_configuration = true"]


def connect(root: str | Path, experiment: str | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with one view per available artifact table, reading nothing
    outside the artifacts root."""
    from leccr.records import runs
    import duckdb

    con = duckdb.connect()
    for statement in view_statements(selected_artifacts(root, experiment)) + runs.view_statements(root):
        con.execute(statement)
    for statement in lock_statements(Store(root).root):
        con.execute(statement)
    return con


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> list:
    """The statements of `sql`, all queries; else raise `ReadOnlyViolation` naming the first that is not
    (a syntax error raises duckdb's own ParserException)."""
    statements = con.extract_statements(sql)
    for statement in statements:
        if statement.type.name not in READ_ONLY_STATEMENTS:
            text = " ".join(statement.query.split())
            kind = _statement_kind(text, statement.type)
            raise ReadOnlyViolation(f"refused {kind} statement {text[:80]!r}: `leccr inspect` only reads the "
                                    "artifacts (SELECT, WITH, FROM, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN); to save a "
                                    "result, redirect `--format csv` or `--format json` output to a file")
    return statements


def _statement_kind(text: str, statement_type: duckdb.StatementType) -> str:
    """The statement's own first keyword (INSTALL, COPY, ATTACH): DuckDB's statement type can name
    another (INSTALL is a LOAD statement to it), which is not what the user wrote."""
    keyword = text.split(None, 1)[0].upper() if text else ""
    if keyword.isalpha() and keyword != "WITH":
        return keyword
    return statement_type.name


def list_views(con: duckdb.DuckDBPyConnection) -> list[str]:
    return [row[0] for row in con.execute(
        "SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY view_name").fetchall()]


FORMATS = ("table", "csv", "json", "markdown")
TABLE_MAX_ROWS = 1000  # the table format is for reading; csv/json/markdown print every row


def run_query(con: duckdb.DuckDBPyConnection, sql: str, fmt: str = "table", width: int | None = None,
              out: TextIO | None = None) -> None:
    """Run read-only `sql` (one or more queries) and print each result in `fmt`.

    `width`: the table format's width (None: no limit, for pipes and files). Raises
    `ReadOnlyViolation` or `duckdb.Error`; nothing runs when any statement is refused.
    """
    out = out or sys.stdout
    for statement in check_read_only(con, sql):
        relation = con.sql(statement.query)
        if relation is None:
            continue
        if fmt == "table":
            out.flush()
            relation.limit(TABLE_MAX_ROWS).show(max_width=width or 10**6, max_rows=TABLE_MAX_ROWS,
                                                max_col_width=width or 10**6)
            continue
        columns, rows = relation.columns, relation.fetchall()
        if fmt == "csv":
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(columns)
            writer.writerows([[_cell(v) for v in row] for row in rows])
        elif fmt == "json":
            out.write(json.dumps([dict(zip(columns, row)) for row in rows], ensure_ascii=False, default=str) + "\n")
        elif fmt == "markdown":
            out.write("| " + " | ".join(_md(c) for c in columns) + " |\n")
            out.write("|" + "---|" * len(columns) + "\n")
            for row in rows:
                out.write("| " + " | ".join(_md(_cell(v)) for v in row) + " |\n")
        else:
            raise ValueError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")


def _cell(value: object) -> object:
    return json.dumps(value, default=str) if isinstance(value, (list, dict)) else value


def _md(value: object) -> str:
    return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")
