"""The `leccr` command: `main(argv)` parses and dispatches, so tests call it with a list."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import yaml

DESCRIPTION = """\
Cross-lingual cross-modal retrieval (LECCR, CL2CM) as a cached, resumable Prefect pipeline.

  leccr demo                                   build demo data + tiny models, run every stage
  leccr run --config C [--stage S] [--force S] [--set KEY=VALUE] [--dry-run]
  leccr sweep --config C --grid PATH=[V1,V2] [--dry-run]   a grid of runs sharing their common stages
  leccr compare [RUN_ID...] [--experiment E] [--sweep S]   runs side by side, with the papers' numbers
  leccr inspect [--experiment NAME] [SQL]      DuckDB over the artifacts, one view per stage
  leccr search "QUERY" --lang de --method leccr  ranked items from the index (--json for scripts)
  leccr serve [--host H] [--port P]            search API and web page (127.0.0.1 by default)
  leccr datasets check PATH --format F         validate a dataset folder
  leccr gc [--yes] [--prune-runs DAYS]         list/delete artifacts no recorded run uses
  leccr build-tiny-models --out DIR --corpus-file F

`leccr COMMAND --help` describes each command; -v shows library logs and tracebacks."""
# `leccr demo` runs the demo with the generator's scene descriptions (what a capable MLLM would say);
# the tiny random-weight LLaVA still describes every item first, through the real describe engine.
DEMO_CONFIG = "configs/demo_scene.yaml"
LLAVA_DEMO_CONFIG = "configs/demo.yaml"
DEMO_ROOT = Path("artifacts/demo")  # demo data and tiny models, referenced by configs/demo.yaml
PROJECT = Path(__file__).resolve().parents[1]


def stage_names() -> list[str]:
    """`leccr.core.dag.stage_names()` without importing the stage modules: every `leccr` call builds the
    parser, and must stay cheap."""
    from leccr.core.dag import declared_upstream, stage_order

    return stage_order(declared_upstream())


class UsageError(ValueError):
    """A command line that cannot mean anything: `leccr: error: ...`, exit 2, as argparse's own."""


def _parse_sets(pairs: list[str], option: str = "--set") -> dict:
    overrides = {}
    for pair in pairs:
        if "=" not in pair:
            raise UsageError(f"{option} expects KEY=VALUE, got {pair!r} (e.g. {option} train.seed=1)")
        key, value = pair.split("=", 1)
        overrides[key] = yaml.safe_load(value)  # "3" -> 3, "[de, fr]" -> list, "true" -> True
    return overrides


def prepare_demo(root: Path = DEMO_ROOT, seed: int = 0) -> dict[str, Path]:
    """Generate the demo dataset, its scene descriptions and the tiny models (each skipped when already
    complete)."""
    from leccr.datasets.demo import (SCENE_DESCRIPTIONS_FILE, SHUFFLED_DESCRIPTIONS_FILE, demo_corpus, generate_demo,
                                     write_scene_descriptions)
    from leccr.tiny_models import build_all

    data = generate_demo(root / "data", seed=seed)
    # Beside the data, not in it: the dataset's content (and every key built on it) stays the same.
    scene = write_scene_descriptions(root / SCENE_DESCRIPTIONS_FILE, seed=seed)
    shuffled = write_scene_descriptions(root / SHUFFLED_DESCRIPTIONS_FILE, seed=seed, shuffled=True)
    models = build_all(root / "models", demo_corpus(data), seed=seed)
    return {"data": data, "scene_descriptions": scene, "shuffled_descriptions": shuffled, **models}


def cmd_run(args: argparse.Namespace) -> int:
    from leccr.config import load_config
    from leccr.core.fingerprint import fingerprinter_for
    from leccr.core.runner import explain, run_pipeline
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
        for line in unkeyed_overrides(cfg, args.set):
            print(line)
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
        from leccr.flows.pipeline import leccr, task_runner

        paths = leccr.with_options(task_runner=task_runner(cfg))(
            config=args.config, stages=stages, force=force, overrides=overrides or None)
    print("\nArtifacts:")
    for stage, path in paths.items():
        print(f"  {stage:<15} {path}")
    if "evaluate" in paths and (Path(paths["evaluate"]) / "report.md").is_file():
        print(f"Report: {Path(paths['evaluate']) / 'report.md'}")
        print("Compare methods: leccr inspect \"SELECT method, lang, value AS sumr FROM metrics "
              "WHERE metric = 'sumr' AND score = 'fused' ORDER BY lang, method\"")
    else:
        print("Inspect them with: leccr inspect \"SELECT * FROM translate LIMIT 5\"")
    return 0


def unkeyed_overrides(cfg, pairs: list[str]) -> list[str]:
    """A note for each `--set` field that cannot change any output under this config: another engine's
    setting (`translate.num_beams` under the import engine), or one that only changes speed or placement.
    Such a field is out of every key, so setting it leaves each stage a cache hit."""
    notes = []
    for dotted in _parse_sets(pairs):
        section_name, _, rest = dotted.partition(".")
        section = getattr(cfg, section_name, None)
        field = rest.split(".", 1)[0]
        if section is None or not field or not hasattr(section, "unused_fields"):
            continue
        # Only another engine's fields: a section's other unused fields are keyed in another form (train's
        # models as resolved model configs, the visual fields of `features` in the visual stage's key).
        if field in section.unused_fields() and hasattr(section, "engine"):
            notes.append(f"note: --set {dotted}: not used by engine {section.engine}; it changes no key")
        elif field in section.NON_OUTPUT_FIELDS and field != "device":  # a device is keyed as its kind
            notes.append(f"note: --set {dotted}: changes speed or where work runs, not output; it changes no key")
    return notes


def cmd_sweep(args: argparse.Namespace) -> int:
    from leccr.core.fingerprint import fingerprinter_for
    from leccr.preflight import check_environment
    from leccr.sweep import dry_run_lines, load_sweep, parse_grid, plan_sweep

    overrides = _parse_sets(args.set)
    if args.runner:
        overrides["runner.kind"] = args.runner
    grid = parse_grid(args.grid) or None
    sweep = load_sweep(args.config, grid, args.name, overrides)  # every variant validated before Prefect starts
    check_environment(sweep.base, write=not args.dry_run)
    stages, force = args.stage or None, args.force or None
    if args.dry_run:
        planned = plan_sweep(sweep, stages, force, fingerprinter_for(sweep.base.artifacts_root))
        print("\n".join(dry_run_lines(sweep, planned)))
        return 0
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # as cmd_run
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from leccr.flows.pipeline import task_runner
    from leccr.flows.sweep import leccr_sweep

    status = leccr_sweep.with_options(task_runner=task_runner(sweep.base))(
        config=args.config, grid=grid, name=sweep.name, stages=stages, force=force, overrides=overrides or None)
    print(f"\nSweep {sweep.name}: {len(status)} runs completed.")
    print(f"Compare them: leccr compare --sweep {sweep.name}"
          + ("" if sweep.base.artifacts_root == "artifacts" else f" --root {sweep.base.artifacts_root}"))
    print(f"Or in SQL: leccr inspect \"SELECT * FROM run_metrics WHERE sweep = '{sweep.name}' AND metric = 'sumr'\"")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from leccr.compare import build, default_out_dir, select_runs, write

    title, records = select_runs(args.root, args.runs, args.experiment, args.sweep)
    comparison = build(args.root, title, records, args.score)
    path = write(comparison, args.out or default_out_dir(args.root, title))
    print(path.read_text(encoding="utf-8"))
    print(f"Written: {path}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from leccr.gc import collect, delete, human_size

    prune = []
    if args.prune_runs is not None:
        from datetime import timedelta

        from leccr.runs import prunable

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


def cmd_demo(args: argparse.Namespace) -> int:
    from leccr.config import load_config

    prepared = prepare_demo(Path(args.root))
    print("Demo inputs ready:", ", ".join(f"{k}={v}" for k, v in prepared.items()))
    cfg = load_config(args.config)
    if cfg.describe.engine == "import":
        # The run imports its descriptions; the MLLM path (engine, prompts, frames) must still run.
        print(f"\nThe tiny random-weight LLaVA describes every item ({LLAVA_DEMO_CONFIG}, stage describe): "
              "the real describe engine, whose text is noise; the run after it imports its descriptions.")
        status = cmd_run(argparse.Namespace(config=LLAVA_DEMO_CONFIG, stage=["describe"],
                                            force=[s for s in args.force if s in ("dataset", "describe")], set=[],
                                            runner=None, ray_address=None, dry_run=False))
        if status != 0:
            return status
        print()
    status = cmd_run(argparse.Namespace(config=args.config, stage=[], force=args.force, set=[], runner=None,
                                        ray_address=None, dry_run=False))
    if status == 0:
        print(f"\nDescriptions in {cfg.name}: {describe_source(cfg)}")
        print_search_commands(args.config)
    return status


def describe_source(cfg) -> str:
    """What wrote the experiment's descriptions: the import file's own "model" (the demo's says "scene
    descriptions from the demo generator (standing in for an MLLM)"), else the engine and model."""
    if cfg.describe.engine == "import":
        from leccr.engines.mllm import load_imported_descriptions

        return load_imported_descriptions(cfg.describe.import_path, cfg.describe.import_view).model \
            or f"imported from {Path(cfg.describe.import_path).name}"
    return f"{cfg.describe.engine} · {Path(cfg.describe.model).name}"


def print_search_commands(config: str) -> None:
    """Ready `leccr search` / `leccr serve` lines for the collection the config indexed (a German caption
    of its first item as the query)."""
    from leccr.config import load_config
    from leccr.search import find_index
    from leccr.schemas.core import read_table
    from leccr.schemas.index import INDEX_ITEMS

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
        from leccr.runs import view_statements as run_view_statements

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


def _index_source(args: argparse.Namespace) -> tuple[str, str | None, str | None]:
    """(artifact root, experiment, dataset folder) from --config, else from the separate options."""
    if args.config is None:
        return args.root, args.experiment, args.data_root
    from leccr.config import load_config

    cfg = load_config(args.config)
    return cfg.artifacts_root, args.experiment or cfg.name, args.data_root or cfg.dataset.path


def cmd_search(args: argparse.Namespace) -> int:
    import json

    from leccr.search.request import check_request

    # The same checks and messages as the API's, before the index opens or a model library loads.
    request = check_request(args.query, args.k, args.candidates)
    from leccr.search.engine import SearchEngine

    engine = SearchEngine.open(*_index_source(args), args.device)
    engine.check(args.method, args.lang)
    hits = engine.search([request.text], args.lang, args.method, request.k, request.candidates)[0]
    if args.json:
        print(json.dumps({"query": request.text, "lang": args.lang, "method": args.method, "k": request.k,
                          "candidates": request.candidates, "index": str(engine.index_dir),
                          "hits": [hit.to_dict(args.lang) for hit in hits]}, ensure_ascii=False, indent=2))
        return 0
    print(f"{len(hits)} hits for {request.text!r} ({args.lang}, {args.method}; index {engine.index_dir.name}):")
    for hit in hits:
        print(f"{hit.rank:>3}. {hit.item_id:<16} score {hit.score:.4f} (cosine {hit.global_score:.4f})  {hit.path or '-'}")
        print(f"     caption: {hit.caption(args.lang)}")
        if hit.description:
            snippet = hit.description if len(hit.description) <= 100 else hit.description[:97] + "..."
            print(f"     description: {snippet}")
            if hit.description_source:
                print(f"       (from {hit.description_source})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from leccr.config import ServeConfig
    from leccr.search.server import serve

    given = {name: getattr(args, name) for name in ServeConfig.model_fields if getattr(args, name) is not None}
    try:
        serving = ServeConfig(**given)
    except ValidationError as error:  # name the option as typed, not the model's field
        raise ValueError("; ".join(f"--{p['loc'][0].replace('_', '-')} {p['input']}: {p['msg']}"
                                   for p in error.errors())) from None
    return serve(*_index_source(args), args.device, args.host, args.port, serving)


def cmd_datasets_check(args: argparse.Namespace) -> int:
    from leccr.datasets.check import check_command

    return check_command(Path(args.path), args.format, _parse_sets(args.option, "--option"))


def cmd_build_tiny_models(args: argparse.Namespace) -> int:
    from leccr.tiny_models import run

    return run(args, args.tiny_parser)


class _Parser(argparse.ArgumentParser):
    """argparse's usage errors in the form of every other `leccr` error: `leccr: error: ...`, exit 2."""

    def error(self, message: str):
        command = self.prog.removeprefix("leccr").strip()
        self.print_usage(sys.stderr)
        print(f"leccr: error: {command + ': ' if command else ''}{message}", file=sys.stderr)
        print(f"leccr: hint: `{self.prog} --help` lists the options", file=sys.stderr)
        raise SystemExit(2)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Fills `{formats}` in help texts when help is shown: listing the dataset formats imports the
    adapters, which a plain `leccr run` need not pay for."""

    def _expand_help(self, action: argparse.Action) -> str:
        text = super()._expand_help(action)
        if "{formats}" in text:
            from leccr.datasets import list_formats

            text = text.replace("{formats}", ", ".join(list_formats()))
        return text


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"leccr {version('leccr')}"
    except PackageNotFoundError:
        return "leccr (not installed: run scripts/setup.sh)"


def _index_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="an experiment file: its artifacts_root, name and dataset.path "
                                         "(the media folder, wherever it lies now) in place of the three options below")
    parser.add_argument("--root", default="artifacts", help="artifact root (default artifacts)")
    parser.add_argument("--experiment", help="the index of this experiment's last run (default: the latest index)")
    parser.add_argument("--data-root", help="the dataset folder holding the media (default: the dataset stage's path)")
    parser.add_argument("--device", default="auto", help="where the query encoder runs (default auto)")


def _count_or_auto(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from leccr.search.request import DEFAULT_CANDIDATES, DEFAULT_K, MAX_CANDIDATES, MAX_K

    stages = stage_names()
    stage_list = ", ".join(stages)
    # -v works before or after the command (`leccr -v run ...`, `leccr run ... -v`). Stage names are
    # checked by the pipeline (UnknownStage lists them) before Prefect starts.
    verbose_help = "show library logs (Prefect, httpx, transformers) and tracebacks"
    verbose = _Parser(add_help=False)  # the commands' -v: absent unless given
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
    parser = _Parser(prog="leccr", description=DESCRIPTION, formatter_class=_HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, **kwargs) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help_text, description=help_text, parents=[verbose],
                                   formatter_class=_HelpFormatter, **kwargs)

    run = command("run", "run the pipeline (embedded Prefect, no server needed)")
    run.add_argument("--config", required=True, help="experiment YAML, e.g. configs/demo.yaml")
    run.add_argument("--stage", action="append", default=[], metavar="STAGE",
                     help=f"run only this stage (and what it needs); repeatable. Stages: {stage_list}")
    run.add_argument("--force", action="append", default=[], metavar="STAGE",
                     help=f"recompute this stage and everything downstream; repeatable. Stages: {stage_list}")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. train.seed=1 or translate.num_beams=4; repeatable")
    run.add_argument("--runner", choices=["local", "ray"], help="override runner.kind")
    run.add_argument("--ray-address", help="override runner.address: ray://host:10001, auto, ...")
    run.add_argument("--dry-run", action="store_true",
                     help="print every planned stage with its key, cached or not, and why it would run; run nothing")
    run.set_defaults(handler=cmd_run)

    sweep = command("sweep", "run a grid of variants of one experiment as one Prefect flow, sharing what they share")
    sweep.add_argument("--config", required=True, help="experiment YAML (its `sweep:` block is the default grid)")
    sweep.add_argument("--grid", action="append", default=[], metavar="PATH=[V1,V2]",
                       help="a config field and its values, e.g. train.models.leccr.losses.w_d=[0.1,0.3]; any --set "
                            "path; repeatable (the grid is every combination)")
    sweep.add_argument("--name", help="the sweep's name in the run records (default: the file's sweep.name, else "
                                      "the experiment and the swept fields)")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key in every variant; repeatable")
    sweep.add_argument("--stage", action="append", default=[], metavar="STAGE",
                       help=f"run only this stage (and what it needs); repeatable. Stages: {stage_list}")
    sweep.add_argument("--force", action="append", default=[], metavar="STAGE",
                       help="recompute this stage and everything downstream (once per distinct key); repeatable")
    sweep.add_argument("--runner", choices=["local", "ray"], help="override runner.kind")
    sweep.add_argument("--dry-run", action="store_true",
                       help="print each run's stages: key, cached or to compute, and which other runs share it")
    sweep.set_defaults(handler=cmd_sweep)

    compare = command("compare", "recorded runs side by side: one table (methods × languages × swept fields), "
                                 "SumR plots, published numbers")
    compare.add_argument("runs", nargs="*", metavar="RUN_ID", help="run ids (or unique prefixes) from the `runs` view")
    compare.add_argument("--experiment", help="the latest run of each variant of this experiment")
    compare.add_argument("--sweep", help="the latest run of each variant of this sweep")
    compare.add_argument("--root", default="artifacts", help="artifact root")
    compare.add_argument("--score", choices=["fused", "global"], default="fused",
                         help="which score's rows (default fused: each method's inference score)")
    compare.add_argument("--out", help="folder for compare.md and its PNGs (default <root>/compare/<name>)")
    compare.set_defaults(handler=cmd_compare)

    gc = command("gc", "list (and with --yes delete) artifacts no recorded run uses")
    gc.add_argument("--root", default="artifacts", help="artifact root")
    gc.add_argument("--yes", action="store_true", help="delete them (never a folder a running stage holds)")
    gc.add_argument("--prune-runs", type=float, metavar="DAYS",
                    help="also drop the run records (artifacts/runs/records) of runs that ended more than DAYS days "
                         "ago, so what only they used is collected; by default every recorded run's artifacts are kept")
    gc.set_defaults(handler=cmd_gc)

    demo = command("demo", "build demo data and tiny models, then run every stage on them (with the demo "
                           "generator's scene descriptions; the tiny LLaVA describes too)")
    demo.add_argument("--root", default=str(DEMO_ROOT),
                      help="folder for the generated demo data and tiny models (default: %(default)s; "
                           "the default config reads them there)")
    demo.add_argument("--config", default=DEMO_CONFIG, help="experiment YAML to run (default: %(default)s)")
    demo.add_argument("--force", action="append", default=[], metavar="STAGE",
                      help=f"recompute this stage and everything downstream; repeatable. Stages: {stage_list}")
    demo.set_defaults(handler=cmd_demo)

    inspect = command("inspect", "query the artifacts with DuckDB (one view per stage)")
    inspect.add_argument("query", nargs="?", help="SQL to run, e.g. \"SELECT * FROM translate LIMIT 5\"")
    inspect.add_argument("--root", default="artifacts", help="artifact root")
    inspect.add_argument("--experiment", help="use this experiment's last run instead of each stage's latest artifact")
    inspect.add_argument("--format", choices=["table", "csv", "json", "markdown"], default="table",
                         help="output format (csv/json/markdown print every row; redirect them to save a result)")
    inspect.add_argument("--print-sql", action="store_true",
                         help="print the CREATE VIEW statements and the read-only settings, for any DuckDB client")
    inspect.set_defaults(handler=cmd_inspect)

    search = command("search", "find indexed images/videos with a text query in a trained language")
    search.add_argument("query", help='the query text, e.g. "ein Hund rennt durch den Schnee"')
    search.add_argument("--lang", default="en", help="the query's language (one the method was trained on; default en)")
    search.add_argument("--method", default="leccr", help="the trained method to search with (default leccr)")
    search.add_argument("-k", type=int, default=DEFAULT_K, help=f"hits to print, 1 to {MAX_K} (default {DEFAULT_K})")
    search.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES,
                        help="items taken from the vector index by global cosine and re-ranked by the method's "
                             f"inference score, 1 to {MAX_CANDIDATES} (default {DEFAULT_CANDIDATES})")
    search.add_argument("--json", action="store_true", help="print the hits as JSON")
    _index_arguments(search)
    search.set_defaults(handler=cmd_search)

    serve = command("serve", "HTTP search API (/api/search) and a web page over the index")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--processes", type=_count_or_auto,
                       help="server processes sharing the port, each with its own models (default auto: one per "
                            "core, at most 4)")
    serve.add_argument("--workers", type=int, help="searches run at once per process (default 1; processes x "
                                                   "workers x torch threads <= cores)")
    serve.add_argument("--torch-threads", type=int, help="torch threads of each search (default 1)")
    serve.add_argument("--max-batch", type=int, help="waiting queries of the same method, language and k "
                                                     "answered together (default 16; 1 = none)")
    serve.add_argument("--queue-depth", type=int,
                       help="searches that may wait per process; past that a search is answered 503 + Retry-After "
                            "(default 64)")
    serve.add_argument("--retry-after-s", type=int, help="the Retry-After seconds of a 503 (default 1)")
    _index_arguments(serve)
    serve.set_defaults(handler=cmd_serve)

    datasets = command("datasets", "dataset tools")
    datasets_commands = datasets.add_subparsers(dest="datasets_command", required=True, metavar="COMMAND")
    check = datasets_commands.add_parser(
        "check", help="validate a dataset folder and report counts and problems", parents=[verbose],
        description="Validate a dataset folder in its published layout: items and captions per split and "
                    "language, missing files, malformed entries.", formatter_class=_HelpFormatter)
    check.add_argument("path", help="the dataset's root folder")
    check.add_argument("--format", required=True, metavar="FORMAT", help="the dataset's layout: {formats}")
    check.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="an adapter option, as dataset.options in an experiment file; repeatable")
    check.set_defaults(handler=cmd_datasets_check)

    from leccr.tiny_models import add_arguments

    tiny = command("build-tiny-models", "build tiny random-weight models (text encoder, vision tower, MT, LLaVA)")
    add_arguments(tiny).set_defaults(handler=cmd_build_tiny_models, tiny_parser=tiny)
    return parser


# Library loggers whose records (even errors) stay out of the console without -v: their failures
# reach the user as the exception `main` reports in one line.
_CHATTY = ("prefect", "httpx", "httpcore", "uvicorn", "fastapi", "docket", "asyncio")
_OWN_CODE = (str(PROJECT / "leccr") + os.sep,)


class _OwnMessages(logging.Filter):
    """Without -v the console shows what leccr's own code logs at INFO and above: stage start and end,
    progress with items/s and ETA, summaries — including what stages log through Prefect's run
    logger, so the record's source file decides, not the logger name. Other libraries: errors only,
    and none from the orchestration stack (Prefect's task-state lines and retries, HTTP requests)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.pathname.startswith(_OWN_CODE):
            return record.levelno >= logging.INFO
        return record.levelno >= logging.ERROR and not record.name.startswith(_CHATTY)


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname}: {text}"


class ConsoleHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now: a rich progress bar swaps it to print lines above the bar.

    (Public name on purpose: Prefect keeps a root handler as the user's only if its class name does
    not start with "_"; otherwise it replaces it with its own console handler.)"""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


def configure_logging(verbose: bool) -> None:
    """Console logging for one `leccr` command (see _OwnMessages); -v: everything, with logger names."""
    handler = ConsoleHandler()
    root = logging.getLogger()
    for previous in [h for h in root.handlers if isinstance(h, ConsoleHandler)]:  # main() called again
        root.removeHandler(previous)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    if verbose:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logging.getLogger("leccr").setLevel(logging.DEBUG)
        return
    handler.setFormatter(_ConsoleFormatter("%(asctime)s %(message)s", "%H:%M:%S"))
    handler.addFilter(_OwnMessages())
    logging.captureWarnings(True)  # library warnings (py.warnings) go through the filter too
    # Read by transformers / huggingface_hub at import: no loading bars, no advice lines.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # The temporary Prefect server is a subprocess writing to our stderr (not through these handlers).
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")


def _hint(error: BaseException, verbose: bool) -> str | None:
    """A next step that fits this error, or None when the message already says what to change."""
    from leccr.search.request import BadQuery, UnknownLanguage, UnknownMethod

    if isinstance(error, (UsageError, BadQuery, UnknownMethod, UnknownLanguage)):
        return None  # the message says what to change: the value's range, the choices (and before the
        # imports below: the pipeline's loads every stage module, seconds a refused query need not wait)
    from leccr.config import ConfigError, ConfigFileMissing
    from leccr.core.dag import UnknownStage
    from leccr.core.failures import StageFailed
    from leccr.preflight import EnvironmentProblem

    if isinstance(error, ConfigFileMissing):
        shipped = sorted(p.relative_to(PROJECT).as_posix() for p in (PROJECT / "configs").glob("*.yaml"))
        return "the experiment files shipped with leccr: " + ", ".join(shipped) if shipped else None
    if isinstance(error, ConfigError):
        return "every section and key, with its default, is in leccr/config.py"
    if isinstance(error, (UnknownStage, EnvironmentProblem, OSError)):
        return None  # the message says what to change: the stages, the path and why
    if isinstance(error, StageFailed):
        return "rerun the same command to resume" + ("" if verbose else "; add -v for the traceback")
    return None if verbose else "add -v for the traceback"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("leccr: interrupted; finished shards are kept and a rerun resumes from them", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the command's one error line; -v keeps the traceback
        if args.verbose:
            logging.getLogger("leccr").exception("leccr %s failed", args.command)
        expected = isinstance(error, (OSError, ValueError, RuntimeError)) and str(error)  # EnvironmentProblem too
        message = _one_line(error) if expected else f"{type(error).__name__}: {error}"
        print(f"leccr: error: {message}", file=sys.stderr)
        if hint := _hint(error, args.verbose):
            print(f"leccr: hint: {hint}", file=sys.stderr)
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
