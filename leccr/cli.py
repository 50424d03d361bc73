"""The `leccr` command. Entry points take argv (`main(sys.argv[1:])`), so tests call them directly.

    leccr demo                                   build demo data + tiny models, run every stage
    leccr run --config C [--stage S] [--force S] [--set KEY=VALUE] [--dry-run]
    leccr inspect [--experiment NAME] [SQL]      DuckDB over the artifacts, one view per stage
    leccr search "QUERY" --lang de --method leccr  ranked items from the index (--json for scripts)
    leccr serve [--host H] [--port P]            search API and web page (127.0.0.1 by default)
    leccr datasets check PATH --format F         validate a dataset folder
    leccr gc [--yes]                             list/delete artifacts no experiment's latest run uses
    leccr build-tiny-models --out DIR --corpus-file F
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import yaml

DEMO_CONFIG = "configs/demo.yaml"
DEMO_ROOT = Path("artifacts/demo")  # demo data and tiny models, referenced by configs/demo.yaml


def _parse_sets(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        overrides[key] = yaml.safe_load(value)  # "3" -> 3, "[de, fr]" -> list, "true" -> True
    return overrides


def prepare_demo(root: Path = DEMO_ROOT, seed: int = 0) -> dict[str, Path]:
    """Generate the demo dataset and build the tiny models (each skipped when already complete)."""
    from leccr.datasets.demo import demo_corpus, generate_demo
    from leccr.tiny_models import build_all

    data = generate_demo(root / "data", seed=seed)
    models = build_all(root / "models", demo_corpus(data), seed=seed)
    return {"data": data, **models}


def cmd_run(args: argparse.Namespace) -> int:
    from leccr.config import load_config
    from leccr.fingerprint import fingerprinter_for
    from leccr.pipeline import explain, run_pipeline
    from leccr.preflight import check_environment

    overrides = _parse_sets(args.set)
    if args.runner:
        overrides["runner.kind"] = args.runner
    if args.ray_address:
        overrides["runner.address"] = args.ray_address
    cfg = load_config(args.config, overrides)  # fail fast, before Prefect starts, on a bad config
    # ... and on an unusable dataset path or artifacts root (a dry run writes nothing: the root may be absent)
    check_environment(cfg, write=not args.dry_run)
    stages, force = args.stage or None, args.force or None
    fingerprints = fingerprinter_for(cfg.artifacts_root)  # one per run: each path is hashed once
    planned = explain(cfg, stages, force, fingerprints)
    if args.dry_run:
        print(f"Plan for experiment {cfg.name} (artifacts under {Path(cfg.artifacts_root).absolute()}):")
        for stage in planned:
            print("  " + stage.line())
        todo = [s.name for s in planned if s.status != "hit"]
        print(f"{len(planned) - len(todo)} cached, {len(todo)} to run" + (f": {', '.join(todo)}" if todo else ""))
        return 0
    if all(stage.status == "hit" for stage in planned):
        # Nothing to compute: no Prefect server, no flow run, just the bookkeeping of a run.
        paths = {name: str(o.artifact.path) for name, o in run_pipeline(cfg, stages, force, fingerprints).items()}
        print(f"All {len(planned)} stages are up to date (cache hits); nothing to run.")
    else:
        # The embedded default starts a temporary Prefect server; Prefect gives it 20 s, which a busy
        # 2-core machine (CI, a laptop also extracting features) can miss. A user's own setting wins.
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
        # Offline, the temporary server's telemetry logs an error on every run.
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        from flows.leccr import leccr, task_runner

        paths = leccr.with_options(task_runner=task_runner(cfg))(
            config=args.config, stages=stages, force=force, overrides=overrides or None)
    print("\nArtifacts:")
    for stage, path in paths.items():
        print(f"  {stage:<9} {path}")
    if "evaluate" in paths and (Path(paths["evaluate"]) / "report.md").is_file():
        print(f"Report: {Path(paths['evaluate']) / 'report.md'}")
        print("Compare methods: leccr inspect \"SELECT method, lang, value AS sumr FROM metrics "
              "WHERE metric = 'sumr' AND score = 'fused' ORDER BY lang, method\"")
    else:
        print("Inspect them with: leccr inspect \"SELECT * FROM translate LIMIT 5\"")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from leccr.gc import collect, delete, human_size

    garbage = collect(args.root)
    if not garbage:
        print(f"Nothing to collect under {Path(args.root).absolute()}: every artifact is referenced.")
        return 0
    for entry in garbage:
        print(f"  {human_size(entry.bytes):>9}  {entry.artifact.stage}/{entry.artifact.key}  {entry.note}")
    deletable = [e for e in garbage if e.deletable]
    total = sum(e.bytes for e in deletable)
    if not args.yes:
        print(f"{len(deletable)} artifact(s), {human_size(total)}, referenced by no experiment's latest run; "
              "delete them with --yes")
        return 0
    removed = delete(args.root, deletable)
    print(f"Deleted {len(removed)} artifact(s), {human_size(sum(e.bytes for e in removed))}.")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    prepared = prepare_demo(Path(args.root))
    print("Demo inputs ready:", ", ".join(f"{k}={v}" for k, v in prepared.items()))
    status = cmd_run(argparse.Namespace(config=args.config, stage=[], force=args.force, set=[], runner=None,
                                        ray_address=None, dry_run=False))
    if status == 0:
        print_search_commands(args.config)
    return status


def print_search_commands(config: str) -> None:
    """Ready `leccr search` / `leccr serve` lines for the collection the config indexed (a German caption
    of its first item as the query)."""
    from leccr.config import load_config
    from leccr.search import find_index
    from schemas.core import read_table
    from schemas.index import INDEX_ITEMS

    cfg = load_config(config)
    index = find_index(cfg.artifacts_root, cfg.name)
    captions = read_table(index.file("items.parquet"), INDEX_ITEMS, columns=["captions"]).column("captions")
    query, lang = next(((c["text"], c["lang"]) for item in captions.to_pylist() for c in item if c["lang"] == "de"),
                       ("a red circle", "en"))
    root = "" if cfg.artifacts_root == "artifacts" else f" --root {cfg.artifacts_root}"
    print(f"\nSearch the collection:\n  leccr search \"{query}\" --lang {lang} --method leccr -k 5{root}\n"
          f"  leccr serve{root}          # then open http://127.0.0.1:8000/")


def cmd_inspect(args: argparse.Namespace) -> int:
    import duckdb

    from leccr.sql import (ReadOnlyViolation, connect, list_views, lock_statements, run_query, selected_artifacts,
                           view_statements)

    if args.print_sql:  # for any DuckDB client: the views, then the same read-only lock
        print(";\n".join(view_statements(selected_artifacts(args.root, args.experiment)) + lock_statements(args.root))
              + ";")
        return 0
    con = connect(args.root, args.experiment)
    views = [v for v in list_views(con) if v != "describe"]  # `descriptions` is the name to use (no quoting)
    if not views:
        print(f"No artifacts under {Path(args.root).absolute()} yet: run `leccr run` first.")
        return 1
    # A terminal's width for tables (COLUMNS wins); none for pipes and files, which get every column whole.
    width = _terminal_width() if sys.stdout.isatty() else None

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


def _terminal_width() -> int:
    import shutil

    return shutil.get_terminal_size().columns


def cmd_search(args: argparse.Namespace) -> int:
    import json

    from leccr.search import SearchEngine, UnknownLanguage, UnknownMethod

    engine = SearchEngine.open(args.root, args.experiment, args.data_root, args.device)
    try:
        hits = engine.search([args.query], args.lang, args.method, args.k, args.candidates)[0]
    except (UnknownMethod, UnknownLanguage) as error:
        print(f"leccr search: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"query": args.query, "lang": args.lang, "method": args.method, "k": args.k,
                          "candidates": args.candidates, "index": str(engine.index_dir),
                          "hits": [hit.to_dict(args.lang) for hit in hits]}, ensure_ascii=False, indent=2))
        return 0
    print(f"{len(hits)} hits for {args.query!r} ({args.lang}, {args.method}; index {engine.index_dir.name}):")
    for hit in hits:
        print(f"{hit.rank:>3}. {hit.item_id:<16} score {hit.score:.4f} (cosine {hit.global_score:.4f})  {hit.path or '-'}")
        print(f"     caption: {hit.caption(args.lang)}")
        if hit.description:
            snippet = hit.description if len(hit.description) <= 100 else hit.description[:97] + "..."
            print(f"     description: {snippet}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from leccr.search.server import serve

    return serve(args.root, args.experiment, args.data_root, args.device, args.host, args.port)


def cmd_datasets_check(args: argparse.Namespace) -> int:
    from leccr.datasets.check import check_command

    return check_command(Path(args.path), args.format, _parse_sets(args.option))


def cmd_build_tiny_models(args: argparse.Namespace) -> int:
    from leccr.tiny_models import main as build_main

    return build_main(args.rest) or 0


def _index_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default="artifacts", help="artifact root (default artifacts)")
    parser.add_argument("--experiment", help="the index of this experiment's last run (default: the latest index)")
    parser.add_argument("--data-root", help="the dataset folder holding the media (default: the dataset stage's path)")
    parser.add_argument("--device", default="auto", help="where the query encoder runs (default auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leccr", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the pipeline (embedded Prefect, no server needed)")
    run.add_argument("--config", required=True, help="experiment YAML, e.g. configs/demo.yaml")
    run.add_argument("--stage", action="append", default=[], help="run only this stage (and what it needs); repeatable")
    run.add_argument("--force", action="append", default=[], help="recompute this stage and everything downstream; repeatable")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. train.seed=1")
    run.add_argument("--runner", choices=["local", "ray"], help="override runner.kind")
    run.add_argument("--ray-address", help="override runner.address: ray://host:10001, auto, ...")
    run.add_argument("--dry-run", action="store_true",
                     help="print every planned stage with its key, cached or not, and why it would run; run nothing")
    run.set_defaults(handler=cmd_run)

    gc = commands.add_parser("gc", help="list (and with --yes delete) artifacts no experiment's latest run uses")
    gc.add_argument("--root", default="artifacts", help="artifact root")
    gc.add_argument("--yes", action="store_true", help="delete them (never a folder a running stage holds)")
    gc.set_defaults(handler=cmd_gc)

    demo = commands.add_parser("demo", help="build demo data and tiny models, then run every stage on them")
    demo.add_argument("--root", default=str(DEMO_ROOT))
    demo.add_argument("--config", default=DEMO_CONFIG)
    demo.add_argument("--force", action="append", default=[])
    demo.set_defaults(handler=cmd_demo)

    inspect = commands.add_parser("inspect", help="query the artifacts with DuckDB (one view per stage)")
    inspect.add_argument("query", nargs="?", help="SQL to run, e.g. \"SELECT * FROM translate LIMIT 5\"")
    inspect.add_argument("--root", default="artifacts", help="artifact root")
    inspect.add_argument("--experiment", help="use this experiment's last run instead of each stage's latest artifact")
    inspect.add_argument("--format", choices=["table", "csv", "json", "markdown"], default="table",
                         help="output format (csv/json/markdown print every row; redirect them to save a result)")
    inspect.add_argument("--print-sql", action="store_true",
                         help="print the CREATE VIEW statements and the read-only settings, for any DuckDB client")
    inspect.set_defaults(handler=cmd_inspect)

    search = commands.add_parser("search", help="find indexed images/videos with a text query in a trained language")
    search.add_argument("query", help='the query text, e.g. "ein Hund rennt durch den Schnee"')
    search.add_argument("--lang", default="en", help="the query's language (one the method was trained on; default en)")
    search.add_argument("--method", default="leccr", help="the trained method to search with (default leccr)")
    search.add_argument("-k", type=int, default=10, help="hits to print (default 10)")
    search.add_argument("--candidates", type=int, default=200,  # leccr.search.DEFAULT_CANDIDATES (not imported: torch)
                        help="items taken from the vector index by global cosine and re-ranked by the method's "
                             "inference score (default 200)")
    search.add_argument("--json", action="store_true", help="print the hits as JSON")
    _index_arguments(search)
    search.set_defaults(handler=cmd_search)

    serve = commands.add_parser("serve", help="HTTP search API (/api/search) and a web page over the index")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    _index_arguments(serve)
    serve.set_defaults(handler=cmd_serve)

    datasets = commands.add_parser("datasets", help="dataset tools")
    datasets_commands = datasets.add_subparsers(dest="datasets_command", required=True)
    check = datasets_commands.add_parser("check", help="validate a dataset folder and report counts and problems")
    check.add_argument("path")
    check.add_argument("--format", required=True)
    check.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    check.set_defaults(handler=cmd_datasets_check)

    tiny = commands.add_parser("build-tiny-models", help="build tiny random-weight models (see --help of the builder)")
    tiny.add_argument("rest", nargs=argparse.REMAINDER)
    tiny.set_defaults(handler=cmd_build_tiny_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from leccr.config import ConfigError
    from leccr.pipeline import UnknownStage
    from leccr.preflight import EnvironmentProblem
    from leccr.store import StageFailed

    try:
        return args.handler(args)
    except (ConfigError, StageFailed, EnvironmentProblem, OSError, UnknownStage) as error:
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"leccr: error: {_one_line(error)}", file=sys.stderr)
        return 2


def _one_line(error: BaseException) -> str:
    """The error as the user should read it: an OS error with its path and a hint where one helps."""
    import errno

    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError) and error.errno is not None:
        where = f" ({error.filename})" if error.filename else ""
        hint = {errno.ENOSPC: "free some space or set another artifacts_root",
                errno.EACCES: "fix the permissions or choose another path",
                errno.EROFS: "the filesystem is read-only: set another artifacts_root"}.get(error.errno)
        return f"{error.strerror}{where}" + (f": {hint}" if hint else "")
    return str(error)


if __name__ == "__main__":
    sys.exit(main())
