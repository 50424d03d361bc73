"""The `leccr` command: `main(argv)` parses and dispatches, so tests call it with a list.

One module per command group (run and sweep, demo, records, search, datasets), each adding its
commands to the parser; console logging is set up apart (`console`)."""
from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys

from leccr.cli import datasets, demo, records, run, search
from leccr.cli.common import PROJECT, Commands, UsageError, stage_names
from leccr.cli.console import configure_logging


DESCRIPTION = """\
Cross-lingual cross-modal retrieval (LECCR, CL2CM) as a cached, resumable Prefect pipeline.

  leccr demo                                   build demo data + tiny models, run every stage
  leccr run --config C [--stage S] [--force S] [--set KEY=VALUE] [--dry-run] [--prefect]
  leccr sweep --config C --grid PATH=[V1,V2] [--dry-run]   a grid of runs sharing their common stages
  leccr compare [RUN_ID...] [--experiment E] [--sweep S]   runs side by side, with the papers' numbers
  leccr inspect [--experiment NAME] [SQL]      DuckDB over the artifacts, one view per stage
  leccr search "QUERY" --lang de --method leccr  ranked items from the index (--json for scripts)
  leccr serve [--host H] [--port P]            search API and web page (127.0.0.1 by default)
  leccr datasets check PATH --format F         validate a dataset folder
  leccr gc [--yes] [--prune-runs DAYS]         list/delete artifacts no recorded run uses
  leccr build-tiny-models --out DIR --corpus-file F

`leccr COMMAND --help` describes each command; -v shows library logs and tracebacks."""


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


def build_parser() -> argparse.ArgumentParser:
    stages = stage_names()
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

    groups = Commands(command, verbose, _HelpFormatter, stages)
    for group in (run, demo, records, search, datasets):  # the order of `leccr --help`
        group.add_commands(groups)
    return parser


def _hint(error: BaseException, verbose: bool) -> str | None:
    """A next step that fits this error, or None when the message already says what to change."""
    from leccr.search.request import BadQuery, UnknownLanguage, UnknownMethod

    if isinstance(error, (UsageError, BadQuery, UnknownMethod, UnknownLanguage)):
        return None  # the message says what to change: the value's range, the choices (and before the
        # imports below: the pipeline's loads every stage module, seconds a refused query need not wait)
    from leccr.config import ConfigError, ConfigFileMissing
    from leccr.core.dag import UnknownStage
    from leccr.core.failures import StageFailed
    from leccr.runtime.preflight import EnvironmentProblem

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
    if argv is None:  # the program itself (`leccr ...`), not a caller in a process that goes on
        atexit.register(_end_without_teardown)
    global _exit_code
    _exit_code = _command(args)
    return _exit_code


_exit_code: int | None = None  # what the program's command returned, for _end_without_teardown


def _end_without_teardown() -> None:
    """End the process once the exit handlers registered after this one have run (Prefect's log
    shipping, temporary folders), skipping the interpreter's teardown of every module: with torch and
    transformers loaded that alone took 2-2.5 s on a busy 2-core machine, after all work was written.
    Registered by `main` when it is the program, so it runs after `main` returned and the output is
    flushed here."""
    if _exit_code is None:
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or gone (a pipe whose reader left): nothing to keep
            pass
    os._exit(_exit_code)


def _command(args: argparse.Namespace) -> int:
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
