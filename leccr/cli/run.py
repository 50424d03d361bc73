"""`leccr run` and `leccr sweep`: one experiment, or a grid of its variants, through the one driver."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from leccr.cli.common import PREFECT_HELP, Commands, parse_sets


def cmd_run(args: argparse.Namespace) -> int:
    from leccr.config import load_config
    from leccr.core.fingerprint import fingerprinter_for
    from leccr.core.driver import run_pipeline
    from leccr.core.explain import explain
    from leccr.runtime.preflight import check_environment

    overrides = parse_sets(args.set)
    if args.runner:
        overrides["runner.kind"] = args.runner
    if args.ray_address:
        overrides["runner.address"] = args.ray_address
    cfg = load_config(args.config, overrides)  # fail fast, before anything runs, on a bad config
    # ... and on an unusable dataset path or artifacts root (a dry run writes nothing: the root may be absent)
    check_environment(cfg, write=not args.dry_run)
    stages, force = args.stage or None, args.force or None
    fingerprints = fingerprinter_for(cfg.artifacts_root)  # one per run: each path is hashed once
    if args.dry_run:
        planned = explain(cfg, stages, force, fingerprints, every_field=args.verbose)
        print(f"Plan for experiment {cfg.name} (artifacts under {Path(cfg.artifacts_root).absolute()}):")
        for stage in planned:
            print("  " + stage.line())
        todo = [s.name for s in planned if s.status != "hit"]
        print(f"{len(planned) - len(todo)} cached, {len(todo)} to run" + (f": {', '.join(todo)}" if todo else ""))
        for line in unkeyed_overrides(cfg, args.set):
            print(line)
        return 0
    why_prefect = prefect_reason(args.prefect, cfg)
    # No preview: a run computes the dataset once, in the store (a preview would compute it twice).
    if why_prefect is None or all(s.status == "hit" for s in explain(cfg, stages, force, fingerprints, False)):
        # In this process (leccr.core.local); with Prefect asked for but nothing to compute, no flow run either.
        outcomes = run_pipeline(cfg, stages, force, fingerprints)
        paths = {name: str(o.artifact.path) for name, o in outcomes.items()}
        if all(o.cache_hit for o in outcomes.values()):
            print(f"All {len(outcomes)} stages are up to date (cache hits); nothing to run.")
    else:
        print(f"Running through Prefect ({why_prefect}).", flush=True)
        # Without PREFECT_API_URL Prefect starts a temporary server, and gives it 20 s, which a busy
        # 2-core machine (CI, a laptop also extracting features) can miss. A user's own setting wins.
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
        # Offline, the temporary server's telemetry logs an error on every run.
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        from leccr.flows.pipeline import experiment_flow, task_runner

        paths = experiment_flow.with_options(task_runner=task_runner(cfg))(
            config=args.config, stages=stages, force=force, overrides=overrides or None)
    print("\nArtifacts:")
    for stage, path in paths.items():
        print(f"  {stage:<15} {path}")
    root = "" if cfg.artifacts_root == "artifacts" else f" --root {cfg.artifacts_root}"
    if "evaluate" in paths and (Path(paths["evaluate"]) / "report.md").is_file():
        print(f"Report: {Path(paths['evaluate']) / 'report.md'}")
        print(f"Compare methods: leccr inspect{root} \"SELECT method, lang, value AS sumr FROM metrics "
              "WHERE metric = 'sumr' AND score = 'fused' ORDER BY lang, method\"")
    elif view := inspect_view(paths):
        print(f"Inspect them with: leccr inspect{root} \"SELECT * FROM {view} LIMIT 5\"")
    return 0


def inspect_view(paths: dict[str, str]) -> str | None:
    """The `leccr inspect` view of the last stage of a run that has one (its files exist): the hint after
    a run names a table that run made."""
    from leccr.core.artifact import stage_of
    from leccr.records.sql import VIEWS

    for label in reversed(paths):
        for view, (stage, pattern) in VIEWS.items():
            # `describe` needs quoting in SQL (`descriptions` is its plain name); error tables are not the output
            if stage == stage_of(label) and view != "describe" and not view.endswith("_errors") \
                    and next(Path(paths[label]).glob(pattern), None) is not None:
                return view
    return None


def prefect_reason(asked: bool, cfg) -> str | None:
    """Why this run goes through Prefect, or None: it runs in this process (leccr.core.local).

    Prefect when asked (`--prefect`), when a server is named by PREFECT_API_URL (its UI then shows the
    run), and for Ray (`runner.kind: ray` runs through Prefect's Ray task runner)."""
    if asked:
        return "--prefect"
    if url := prefect_api_url():
        return f"PREFECT_API_URL={url}"
    if cfg.runner.kind == "ray":
        return "runner.kind: ray"
    return None


def prefect_api_url() -> str | None:
    """PREFECT_API_URL from the environment, else from the active Prefect profile (`prefect config set
    PREFECT_API_URL=...` writes it there), read without importing Prefect (a second or two)."""
    import tomllib

    if url := os.environ.get("PREFECT_API_URL"):
        return url
    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    profiles = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        data = tomllib.loads(profiles.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or data.get("active")
    return (data.get("profiles", {}).get(active) or {}).get("PREFECT_API_URL") or None


def unkeyed_overrides(cfg, pairs: list[str]) -> list[str]:
    """A note for each `--set` field that cannot change any output under this config: another engine's
    setting (`translate.num_beams` under the import engine), or one that only changes speed or placement.
    Such a field is out of every key, so setting it leaves each stage a cache hit."""
    notes = []
    for dotted in parse_sets(pairs):
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
    from leccr.runtime.preflight import check_environment
    from leccr.records.sweep import dry_run_lines, load_sweep, parse_grid, plan_sweep

    overrides = parse_sets(args.set)
    if args.runner:
        overrides["runner.kind"] = args.runner
    grid = parse_grid(args.grid) or None
    sweep = load_sweep(args.config, grid, args.name, overrides)  # every variant validated before anything runs
    check_environment(sweep.base, write=not args.dry_run)
    stages, force = args.stage or None, args.force or None
    if args.dry_run:
        planned = plan_sweep(sweep, stages, force, fingerprinter_for(sweep.base.artifacts_root))
        print("\n".join(dry_run_lines(sweep, planned)))
        return 0
    why_prefect = prefect_reason(args.prefect, sweep.base)
    if why_prefect is None:
        from leccr.records.sweep import run_sweep

        status = run_sweep(sweep, stages, force)
    else:
        print(f"Running through Prefect ({why_prefect}).", flush=True)
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # as cmd_run
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        from leccr.flows.pipeline import task_runner
        from leccr.flows.sweep import sweep_flow

        status = sweep_flow.with_options(task_runner=task_runner(sweep.base))(
            config=args.config, grid=grid, name=sweep.name, stages=stages, force=force,
            overrides=overrides or None)
    print(f"\nSweep {sweep.name}: {len(status)} runs completed.")
    root = "" if sweep.base.artifacts_root == "artifacts" else f" --root {sweep.base.artifacts_root}"
    print(f"Compare them: leccr compare --sweep {sweep.name}{root}")
    print(f"Or in SQL: leccr inspect{root} \"SELECT * FROM run_metrics WHERE sweep = '{sweep.name}' AND metric = 'sumr'\"")
    return 0


def add_commands(commands: Commands) -> None:
    stage_list = ", ".join(commands.stages)
    run = commands.add("run", "run the pipeline (in this process; --prefect or PREFECT_API_URL: as a Prefect flow run)")
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
                     help="print every planned stage with its key, cached or not, and why it would run (with -v: "
                          "every changed field); run nothing")
    run.add_argument("--prefect", action="store_true", help=PREFECT_HELP)
    run.set_defaults(handler=cmd_run)

    sweep = commands.add("sweep", "run a grid of variants of one experiment, sharing what they share (--prefect: as one "
                             "Prefect flow run)")
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
    sweep.add_argument("--prefect", action="store_true", help=PREFECT_HELP)
    sweep.set_defaults(handler=cmd_sweep)
