"""The docs say what the code does: every module, attribute and file they name exists, every docs page is
reached from the README, and every link between them lands.

Read: README.md, CHANGELOG.md, docs/*.md and pyproject.toml (its comments and values). Names are checked as
written, so a module that moves must take its mentions along:
- dotted names under `leccr` (`leccr.core.keys`, `leccr.core.keys.STORE_FORMAT`, `leccr.cli:main`) must
  import as a module or package, or be an attribute of one;
- project paths (`leccr/core/memo.py`, `scripts/demo.sh`, `tests/faults/`, `stages/describe.py` once stages
  stand at the root) must exist relative to the repository root when they end in a file extension or `/`;
  `leccr/full` (a deployment) and `artifacts/<stage>/` (run output) are not project paths.
"""

import importlib
import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
PAGES = ["README.md", "CHANGELOG.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))]
SOURCES = [*PAGES, "pyproject.toml"]

# A dotted name starts the token: `train.models.leccr.losses.w_d` (a config path) and `models/leccr.py` are not.
DOTTED = re.compile(r"(?<![\w./-])leccr(?:\.[A-Za-z_]\w*)+(?::[A-Za-z_]\w*)?")
# A project path: one of the repository's top-level folders, then a file name with an extension or a folder.
ROOTS = r"(?:leccr|stages|schemas|flows|scripts|benchmarks|configs|tests|docs|\.ci)"
PATH = re.compile(rf"(?<![\w./-]){ROOTS}/(?:[\w.-]+/)*(?:[\w-]+\.[a-z]+|)(?![\w/-])")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _text(name: str) -> str:
    return (REPO / name).read_text(encoding="utf-8")


def dotted_names(text: str) -> set[str]:
    """Every `leccr.…` name in `text`, without a trailing sentence period."""
    return {match.group(0) for match in DOTTED.finditer(text)}


def project_paths(text: str) -> set[str]:
    return {match.group(0) for match in PATH.finditer(text)}


def resolves(name: str) -> str | None:
    """None when `name` is an importable module or package, or an attribute of one; else why not."""
    dotted, _, attribute = name.partition(":")
    parts = dotted.split(".")
    module = parts[0]
    rest = parts[1:]
    while rest:  # the longest prefix that is a module
        try:
            found = importlib.util.find_spec(f"{module}.{rest[0]}")
        except ModuleNotFoundError:  # the prefix is a module, not a package
            found = None
        if found is None:
            break
        module = f"{module}.{rest.pop(0)}"
    value = importlib.import_module(module)
    for part in rest + ([attribute] if attribute else []):
        if not hasattr(value, part):
            return f"{module} has no module or attribute {part!r}"
        value = getattr(value, part)
    return None


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {slug(line.lstrip("#")) for line in text.splitlines() if re.match(r"#{1,6} ", line)}


@pytest.mark.parametrize("source", SOURCES)
def test_named_modules_exist(source):
    missing = {name: why for name in sorted(dotted_names(_text(source))) if (why := resolves(name))}
    assert not missing, f"{source} names modules that do not exist: {missing}"


@pytest.mark.parametrize("source", SOURCES)
def test_named_paths_exist(source):
    missing = sorted(path for path in project_paths(_text(source)) if not (REPO / path).exists())
    assert not missing, f"{source} names paths that do not exist: {missing}"


@pytest.mark.parametrize("source", PAGES)
def test_links_land(source):
    page = REPO / source
    broken = []
    for target in LINK.findall(_text(source)):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{source} has links that lead nowhere: {broken}"


def test_readme_links_every_docs_page():
    readme = _text("README.md")
    unlinked = [page for page in PAGES if page.startswith("docs/") and f"]({page})" not in readme]
    unlinked += [] if "](CHANGELOG.md)" in readme else ["CHANGELOG.md"]
    assert not unlinked, f"README.md does not link {unlinked}"


def test_pages_stand_alone():
    """The docs are for users of a clone: they name nothing outside the repository's own files."""
    leaks = [page for page in PAGES if re.search(r"\.\./shared|/work/", _text(page))]
    assert not leaks, f"pages that point outside the repository: {leaks}"


def test_the_checks_catch_drift():
    """The patterns find what they must and leave config paths, deployments and run output alone."""
    text = (
        "`leccr.fingerprint` and `leccr.core.keys.STORE_FORMAT`, leccr.cli:main; `train.models.leccr.losses.w_d`, "
        "models/leccr.py, leccr/full, artifacts/<stage>/<key>/, stages/describe.py, leccr/datasets/<format>.py, "
        "tests/faults/ and `scripts/demo.sh`."
    )
    assert dotted_names(text) == {"leccr.fingerprint", "leccr.core.keys.STORE_FORMAT", "leccr.cli:main"}
    assert project_paths(text) == {"stages/describe.py", "leccr/datasets/", "tests/faults/", "scripts/demo.sh"}
    assert resolves("leccr.core.keys.STORE_FORMAT") is None and resolves("leccr.cli:main") is None
    assert resolves("leccr.fingerprint") == "leccr has no module or attribute 'fingerprint'"
    assert resolves("leccr.core.keys.NO_SUCH_NAME")
    assert slug("Many clients at once") == "many-clients-at-once"
    assert slug("As a Prefect deployment (`leccr/full`)") == "as-a-prefect-deployment-leccrfull"
