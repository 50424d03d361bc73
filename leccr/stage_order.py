"""The stages of the DAG and their order, read from the `stages/` package's source without importing it.

Every module of `stages/` whose name does not start with "_" is a stage of that name; its literal
`UPSTREAM` names the stages it reads; the order is topological over those, sorted within each ready
set (one stable order for every run). The pipeline imports the modules and checks them against this;
the CLI builds its help from it without paying for those imports.
"""
from __future__ import annotations

import ast
import graphlib
from pathlib import Path

STAGES_DIR = Path(__file__).resolve().parents[1] / "stages"


def declared_upstream(stages_dir: Path = STAGES_DIR) -> dict[str, tuple[str, ...]]:
    """{stage: its UPSTREAM} as each module spells it (a literal tuple)."""
    upstream: dict[str, tuple[str, ...]] = {}
    for path in sorted(stages_dir.glob("*.py")):
        if path.stem.startswith("_"):
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            target = node.target if isinstance(node, ast.AnnAssign) else (
                node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
            if isinstance(target, ast.Name) and target.id == "UPSTREAM" and node.value is not None:
                upstream[path.stem] = tuple(ast.literal_eval(node.value))
        if path.stem not in upstream:
            raise RuntimeError(f"stage module {path} has no literal UPSTREAM tuple")
    return upstream


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
