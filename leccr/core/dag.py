"""The DAG: which stages there are, their order, and which of them a run needs.

Every module of `stages/` whose name does not start with "_" is a stage of that name and ends with
`STAGE = StageDef(...)`. Its literal `upstream=(...)` is read from the source without importing the
module (the CLI builds its help from it without paying for torch); the order is topological over
those, sorted within each ready set (one stable order for every run). `stage_defs()` imports the
modules and checks each StageDef against what the source said.
"""
from __future__ import annotations

import ast
import functools
import graphlib
import importlib
from dataclasses import dataclass
from pathlib import Path

from leccr.core.stage import StageDef

STAGES_PACKAGE = "leccr.stages"
STAGES_DIR = Path(__file__).resolve().parents[1] / "stages"


class UnknownStage(ValueError):
    """A stage name that is not a stage of this pipeline."""


def _literal_upstream(path: Path) -> tuple[str, ...]:
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id == "STAGE" and isinstance(node.value, ast.Call)):
            continue
        for keyword in node.value.keywords:
            if keyword.arg == "upstream":
                return tuple(ast.literal_eval(keyword.value))
    raise RuntimeError(f"stage module {path} has no `STAGE = StageDef(..., upstream=(...), ...)` with a literal upstream")


def declared_upstream(stages_dir: Path = STAGES_DIR) -> dict[str, tuple[str, ...]]:
    """{stage: its upstream} as each module spells it (a literal tuple)."""
    return {path.stem: _literal_upstream(path) for path in sorted(stages_dir.glob("*.py"))
            if not path.stem.startswith("_")}


def stage_order(upstream: dict[str, tuple[str, ...]]) -> list[str]:
    """Upstream before downstream; ties broken by name."""
    for name, ups in upstream.items():
        unknown = [up for up in ups if up not in upstream]
        if unknown:
            raise RuntimeError(f"stage {name!r} names unknown upstream stage(s) {unknown}")
    graph = graphlib.TopologicalSorter(upstream)
    graph.prepare()
    order: list[str] = []
    while graph.is_active():
        ready = sorted(graph.get_ready())
        order.extend(ready)
        graph.done(*ready)
    return order


@functools.lru_cache(maxsize=1)
def stage_defs() -> dict[str, StageDef]:
    upstream = declared_upstream()
    defs = {}
    for name in stage_order(upstream):
        module = importlib.import_module(f"{STAGES_PACKAGE}.{name}")
        stage = getattr(module, "STAGE", None)
        if not isinstance(stage, StageDef):
            raise RuntimeError(f"stage module {module.__name__} must define STAGE = StageDef(...)")
        if stage.name != name or stage.upstream != upstream[name]:
            raise RuntimeError(f"stage module {module.__name__}: STAGE names {stage.name!r} with upstream "
                               f"{stage.upstream}, the module is {name!r} with literal upstream {upstream[name]}")
        defs[name] = stage
    return defs


def stage_names() -> tuple[str, ...]:
    """Every stage of the DAG, upstream before downstream."""
    return tuple(stage_defs())


def get_stage(name: str) -> StageDef:
    try:
        return stage_defs()[name]
    except KeyError:
        raise UnknownStage(f"unknown stage {name!r}; the stages are: {', '.join(stage_names())}") from None


def check_stage_names(names: list[str]) -> None:
    """Raise UnknownStage naming the valid stages if any name is not a stage."""
    for name in names:
        get_stage(name)


@dataclass(frozen=True)
class Plan:
    """Which stages run, in order, and which of them are forced to recompute."""

    order: tuple[str, ...]
    forced: frozenset[str]


def plan(stages: list[str] | None = None, force: list[str] | None = None) -> Plan:
    """Stages to run: the requested ones (default: all) and everything they need upstream.

    Forcing a stage also forces everything downstream of it that runs.
    """
    check_stage_names(list(stages or []) + list(force or []))
    wanted = set(stages or stage_names())
    for name in reversed(stage_names()):  # add upstream closure
        if name in wanted:
            wanted.update(get_stage(name).upstream)
    order = tuple(name for name in stage_names() if name in wanted)
    forced = set(force or [])
    for name in order:
        if any(up in forced for up in get_stage(name).upstream):
            forced.add(name)
    return Plan(order, frozenset(forced & set(order)))
