"""`leccr datasets check` and `leccr build-tiny-models`: dataset folders and the tiny models of tests and the demo."""
from __future__ import annotations

import argparse
from pathlib import Path

from leccr.cli.common import Commands, parse_sets


def cmd_datasets_check(args: argparse.Namespace) -> int:
    from leccr.datasets.check import check_command

    return check_command(Path(args.path), args.format, parse_sets(args.option, "--option"))


def cmd_build_tiny_models(args: argparse.Namespace) -> int:
    from leccr.tiny_models import run

    return run(args, args.tiny_parser)


def add_commands(commands: Commands) -> None:
    datasets = commands.add("datasets", "dataset tools")
    datasets_commands = datasets.add_subparsers(dest="datasets_command", required=True, metavar="COMMAND")
    check = datasets_commands.add_parser(
        "check", help="validate a dataset folder and report counts and problems", parents=[commands.verbose],
        description="Validate a dataset folder in its published layout: items and captions per split and "
                    "language, missing files, malformed entries.", formatter_class=commands.formatter)
    check.add_argument("path", help="the dataset's root folder")
    check.add_argument("--format", required=True, metavar="FORMAT", help="the dataset's layout: {formats}")
    check.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="an adapter option, as dataset.options in an experiment file; repeatable")
    check.set_defaults(handler=cmd_datasets_check)

    from leccr.tiny_models import add_arguments

    tiny = commands.add("build-tiny-models", "build tiny random-weight models (text encoder, vision tower, MT, LLaVA)")
    add_arguments(tiny).set_defaults(handler=cmd_build_tiny_models, tiny_parser=tiny)
