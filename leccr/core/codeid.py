"""Code identity of a stage: a digest of the source it runs, as HF `datasets` fingerprints a transform.

A stage's key must change when the code that produces its output changes, and only then. Explicit
version numbers rot (every stage said "1" through many output-changing commits), so the digest is
computed from the source itself: the stage module and every project module it imports, directly or
through others, at module level or inside a function (found by reading the syntax tree, without
importing anything). Each module counts by its syntax tree with docstrings removed, so comments,
docstrings and formatting do not change a key; any change to what the code does, does.

Modules that decide *where* results go and *whether* to reuse them, not what they hold, are left out
(`NOT_OUTPUT_CODE`): the cache core `leccr.core` (its file layout is versioned by
`leccr.core.keys.STORE_FORMAT`, which every key includes), config parsing (a section's values are
hashed as data, defaults included), progress display and device choice (hashed as what it resolves to).
Library versions (torch, transformers) are not in the key; manifests record them.
"""
from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PROJECT_PACKAGES = ("leccr",)
NOT_OUTPUT_CODE = frozenset({
    "leccr.config", "leccr.runtime.progress", "leccr.runtime.device", "leccr.records.sql", "leccr.records.gc",
    "leccr.runtime.preflight",
})
NOT_OUTPUT_PACKAGES = ("leccr.core", "leccr.cli")


def module_file(name: str, root: Path = PROJECT_ROOT) -> Path | None:
    """The source file of a project module (`a.b` → a/b.py or a/b/__init__.py), None if there is none."""
    parts = name.split(".")
    if parts[0] not in PROJECT_PACKAGES:
        return None
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _imports(tree: ast.AST, name: str, is_package: bool) -> set[str]:
    """Project modules named by the import statements of one module (relative imports resolved)."""
    found: set[str] = set()
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            # `from pkg import sub` may name a submodule: counted when such a file exists.
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


@functools.lru_cache(maxsize=None)
def _module_digest(name: str, root: Path) -> tuple[str, frozenset[str]]:
    """(digest of one module's docstring-free syntax tree, the project modules it imports)."""
    path = module_file(name, root)
    assert path is not None
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    imports = {m for m in _imports(tree, name, path.name == "__init__.py") if module_file(m, root) is not None}
    # A submodule import runs its parent packages' __init__ too.
    for module in list(imports):
        parts = module.split(".")
        imports.update(".".join(parts[:i]) for i in range(1, len(parts)) if module_file(".".join(parts[:i]), root))
    digest = hashlib.sha256(ast.dump(_strip_docstrings(tree)).encode()).hexdigest()
    return digest, frozenset(imports - {name})


def code_modules(module: str, root: Path = PROJECT_ROOT) -> dict[str, str]:
    """Every project module `module` runs (itself included), less NOT_OUTPUT_CODE: {name: digest}."""
    seen: dict[str, str] = {}
    pending = [module]
    while pending:
        name = pending.pop()
        if name in seen or (name != module and not_output(name)):
            continue
        digest, imports = _module_digest(name, root)
        seen[name] = digest
        pending.extend(sorted(imports))
    return dict(sorted(seen.items()))


def not_output(name: str) -> bool:
    return name in NOT_OUTPUT_CODE or any(name == p or name.startswith(p + ".") for p in NOT_OUTPUT_PACKAGES)


def code_digest(module: str, root: Path = PROJECT_ROOT) -> str:
    """The code identity of a stage module: one digest over every module it runs."""
    modules = code_modules(module, root)
    return hashlib.sha256("".join(f"{name}\0{digest}\n" for name, digest in modules.items()).encode()).hexdigest()
