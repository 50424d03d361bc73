"""What every command group shares: usage errors, `--set` parsing, the stage names, the project folder."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml


PROJECT = Path(__file__).resolve().parents[2]
PREFECT_HELP = ("run as a Prefect flow run: on the server PREFECT_API_URL names (which also selects Prefect), "
                "else on a temporary local one (about 20 s to start); default: in this process, no server")


@dataclass(frozen=True)
class Commands:
    """What a command group needs to add its commands to the `leccr` parser: `add(name, help)` makes a
    command's parser (with the shared -v), and a nested group takes `verbose` and `formatter` too."""

    add: Callable[..., argparse.ArgumentParser]
    verbose: argparse.ArgumentParser
    formatter: type[argparse.HelpFormatter]
    stages: list[str]


def stage_names() -> list[str]:
    """`leccr.core.dag.stage_names()` without importing the stage modules: every `leccr` call builds the
    parser, and must stay cheap."""
    from leccr.core.dag import declared_upstream, stage_order

    return stage_order(declared_upstream())


class UsageError(ValueError):
    """A command line that cannot mean anything: `leccr: error: ...`, exit 2, as argparse's own."""


def parse_sets(pairs: list[str], option: str = "--set") -> dict:
    overrides = {}
    for pair in pairs:
        if "=" not in pair:
            raise UsageError(f"{option} expects KEY=VALUE, got {pair!r} (e.g. {option} train.seed=1)")
        key, value = pair.split("=", 1)
        overrides[key] = yaml.safe_load(value)  # "3" -> 3, "[de, fr]" -> list, "true" -> True
    return overrides


def terminal_width() -> int:
    import shutil

    return shutil.get_terminal_size().columns
