"""`leccr inspect`, `leccr compare` and `leccr gc`: the store and the run records, read and collected."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from leccr.cli.common import Commands, terminal_width


def cmd_compare(args: argparse.Namespace) -> int:
    from leccr.evaluation.compare import build, default_out_dir, select_runs, write

    title, records = select_runs(args.root, args.runs, args.experiment, args.sweep)
    comparison = build(args.root, title, records, args.score)
    path = write(comparison, args.out or default_out_dir(args.root, title))
    print(path.read_text(encoding="utf-8"))
    print(f"Written: {path}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from leccr.records.gc import collect, delete, human_size

    prune = []
    if args.prune_runs is not None:
        from datetime import timedelta

        from leccr.records.runs import prunable

        prune = prunable(args.root, timedelta(days=args.prune_runs))
        print(f"{len(prune)} run record(s) ended more than {args.prune_runs:g} day(s) ago: "
              + ("deleted; their artifacts are no longer kept for them" if args.yes
                 else "their artifacts are listed below unless another run uses them; --yes deletes them"))
        if args.yes:
            for record in prune:
                record.unlink()
    garbage = collect(args.root, prune)
    if not garbage:
        print(f"Nothing to collect under {Path(args.root).absolute()}: every artifact is referenced.")
        return 0
    for entry in garbage:
        print(f"  {human_size(entry.bytes):>9}  {entry.artifact.stage}/{entry.artifact.key}  {entry.note}")
    deletable = [e for e in garbage if e.deletable]
    total = sum(e.bytes for e in deletable)
    if not args.yes:
        print(f"{len(deletable)} artifact(s), {human_size(total)}, referenced by no recorded run; "
              "delete them with --yes")
        return 0
    removed = delete(args.root, deletable)
    print(f"Deleted {len(removed)} artifact(s), {human_size(sum(e.bytes for e in removed))}.")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import duckdb

    from leccr.records.sql import (ReadOnlyViolation, connect, list_views, lock_statements, run_query, selected_artifacts,
                           view_statements)

    if args.print_sql:  # for any DuckDB client: the views, then the same read-only lock
        from leccr.records.runs import view_statements as run_view_statements

        print(";\n".join(view_statements(selected_artifacts(args.root, args.experiment))
                         + run_view_statements(args.root) + lock_statements(args.root))
              + ";")
        return 0
    con = connect(args.root, args.experiment)
    views = [v for v in list_views(con) if v != "describe"]  # `descriptions` is the name to use (no quoting)
    if not views:
        print(f"No artifacts under {Path(args.root).absolute()} yet: run `leccr run` first.")
        return 1
    # A terminal's width for tables (COLUMNS wins); none for pipes and files, which get every column whole.
    width = terminal_width() if sys.stdout.isatty() else None

    def query(sql: str) -> bool:
        try:
            run_query(con, sql, args.format, width)
            return True
        except (ReadOnlyViolation, duckdb.Error) as error:
            print(f"leccr: error: {error}", file=sys.stderr)
            return False

    if args.query:
        return 0 if query(args.query) else 1
    counts = {v: con.execute('SELECT count(*) FROM "' + v + '"').fetchone()[0] for v in views}
    print("Views:", ", ".join(f"{v} ({n} rows)" for v, n in counts.items()))
    if not sys.stdin.isatty():
        return 0
    print("Enter SQL (empty line to quit).")
    while (line := input("leccr> ").strip()):
        query(line)
    return 0


def add_commands(commands: Commands) -> None:
    compare = commands.add("compare", "recorded runs side by side: one table (methods × languages × swept fields), "
                                 "SumR plots, published numbers")
    compare.add_argument("runs", nargs="*", metavar="RUN_ID", help="run ids (or unique prefixes) from the `runs` view")
    compare.add_argument("--experiment", help="the latest run of each variant of this experiment")
    compare.add_argument("--sweep", help="the latest run of each variant of this sweep")
    compare.add_argument("--root", default="artifacts", help="artifact root")
    compare.add_argument("--score", choices=["fused", "global"], default="fused",
                         help="which score's rows (default fused: each method's inference score)")
    compare.add_argument("--out", help="folder for compare.md and its PNGs (default <root>/compare/<name>)")
    compare.set_defaults(handler=cmd_compare)

    gc = commands.add("gc", "list (and with --yes delete) artifacts no recorded run uses")
    gc.add_argument("--root", default="artifacts", help="artifact root")
    gc.add_argument("--yes", action="store_true", help="delete them (never a folder a running stage holds)")
    gc.add_argument("--prune-runs", type=float, metavar="DAYS",
                    help="also drop the run records (artifacts/runs/records) of runs that ended more than DAYS days "
                         "ago, so what only they used is collected; by default every recorded run's artifacts are kept")
    gc.set_defaults(handler=cmd_gc)
    inspect = commands.add("inspect", "query the artifacts with DuckDB (one view per stage)")
    inspect.add_argument("query", nargs="?", help="SQL to run, e.g. \"SELECT * FROM translate LIMIT 5\"")
    inspect.add_argument("--root", default="artifacts", help="artifact root")
    inspect.add_argument("--experiment", help="use this experiment's last run instead of each stage's latest artifact")
    inspect.add_argument("--format", choices=["table", "csv", "json", "markdown"], default="table",
                         help="output format (csv/json/markdown print every row; redirect them to save a result)")
    inspect.add_argument("--print-sql", action="store_true",
                         help="print the CREATE VIEW statements and the read-only settings, for any DuckDB client")
    inspect.set_defaults(handler=cmd_inspect)
