"""The papers' published numbers, beside ours.

`leccr/evaluation/published_results.yaml` holds rows transcribed from the papers or from their authors' own
repositories (NRCCR's README at a named commit), each with its source: paper or repository, table or
section, and row. An
experiment names the rows it can be compared with in `evaluate.published` (each dataset preset in
configs/ does); a row is shown only where the run evaluates its dataset and language, so a preset
pointed at other data shows none, and says so. The evaluate report and `leccr compare` print them
beside our numbers with the difference.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml

DATA_FILE = Path(__file__).with_name("published_results.yaml")
DIRECTIONS = ("text_to_visual", "visual_to_text")
# Published recalls and SumR are rounded to one decimal: each of the six parts is off by up to 0.05 and
# the SumR by 0.05 more, so their sum may miss the SumR by up to 0.35 (NRCCR's VATEX row: 366.6 against
# a published 366.5). A gap past that is a transcription error.
SUM_TOLERANCE = 0.35 + 1e-9


@functools.lru_cache(maxsize=4)
def load(path: Path = DATA_FILE) -> dict[str, dict[str, Any]]:
    """{row id: row} with each row's paper resolved (title, venue, url); checked on the way in."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    papers = data["papers"]
    rows = {}
    for row in data["rows"]:
        for name in ("id", "paper", "table", "row", "method", "dataset", "lang", "sumr"):
            if name not in row:
                raise ValueError(f"{path}: row {row.get('id', row)} has no {name!r}")
        if row["paper"] not in papers:
            raise ValueError(f"{path}: row {row['id']} names unknown paper {row['paper']!r}")
        source = papers[row["paper"]]
        if "repository" in source and not _is_commit(str(source.get("commit", ""))):
            raise ValueError(f"{path}: source {row['paper']!r} is a repository: it needs the full commit its "
                             f"numbers were read at, got {source.get('commit')!r}")
        recall = row.get("recall") or {}
        for direction, values in recall.items():
            if direction not in DIRECTIONS or len(values) != 3:
                raise ValueError(f"{path}: row {row['id']}: recall needs {DIRECTIONS} with R@1, R@5, R@10")
        if len(recall) == 2:  # where both directions are given, SumR is their sum: a transcription check
            total = sum(sum(values) for values in recall.values())
            if abs(total - row["sumr"]) > SUM_TOLERANCE:
                raise ValueError(f"{path}: row {row['id']}: R@K sum to {total:.1f}, not its SumR {row['sumr']} "
                                 f"(more than the {SUM_TOLERANCE:.2f} that rounding to one decimal allows)")
        if row["id"] in rows:
            raise ValueError(f"{path}: row id {row['id']} appears twice")
        rows[row["id"]] = {**row, "source": source}
    return rows


def _is_commit(text: str) -> bool:
    return len(text) == 40 and all(c in "0123456789abcdef" for c in text)


def rows_named(ids: list[str], path: Path = DATA_FILE) -> list[dict[str, Any]]:
    known = load(path)
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise ValueError(f"evaluate.published names unknown row(s) {unknown}; rows in {path.name}: {sorted(known)}")
    return [known[i] for i in ids]


def matching(ids: list[str], dataset_format: str, languages: list[str], path: Path = DATA_FILE
             ) -> list[dict[str, Any]]:
    """The rows of `ids` for this dataset format and one of these evaluated languages."""
    return [row for row in rows_named(ids, path) if row["dataset"] == dataset_format and row["lang"] in languages]


def matching_rows(config: dict[str, Any], path: Path = DATA_FILE) -> list[dict[str, Any]]:
    """The rows an effective config (as a dict) names whose dataset and language it evaluates."""
    languages = config["evaluate"].get("languages") or ["en", *config["dataset"]["languages"]]
    return matching(config["evaluate"].get("published") or [], config["dataset"]["format"], languages, path)


def why_none(any_named: bool) -> str:
    """Why no published row is shown."""
    if not any_named:
        return ("No published numbers match: the experiment names none (`evaluate.published` is empty). "
                "The dataset presets in configs/ name the papers' rows for their benchmarks; the demo's "
                "generated data is no benchmark, so it names none.")
    return ("No published numbers match: the rows named in `evaluate.published` are for another dataset or "
            "language than this evaluates.")


def source_text(row: dict[str, Any]) -> str:
    source = row["source"]
    where = f", {source['repository']}@{source['commit'][:12]} {source['file']}" if "repository" in source else ""
    return f"{source['title']} ({source['venue']}){where}, {row['table']}, row \"{row['row']}\""


def published_markdown(rows: list[dict[str, Any]], any_named: bool,
                       ours: dict[tuple[str, str], float] | None = None) -> list[str]:
    """A "Published numbers" section: each row with its source, beside `ours` {(method, lang): SumR}
    where given, with the difference (ours − published)."""
    lines = ["## Published numbers", ""]
    if not rows:
        return lines + [f"_{why_none(any_named)}_", ""]
    ours = ours or {}
    header = "| Method | Lang | " + " | ".join(f"{a} R@{k}" for a in ("T→V", "V→T") for k in (1, 5, 10))
    lines += [header + " | SumR | ours | Δ | source |", "|---|---|" + "---:|" * 9 + "---|"]
    for row in rows:
        recall = row.get("recall") or {}
        cells = [f"{v:.1f}" for d in DIRECTIONS for v in recall.get(d, [])]
        cells = cells if len(cells) == 6 else ["–"] * 6
        mine = ours.get((row["method"], row["lang"]))
        lines.append(f"| {row['method']} | {row['lang']} | " + " | ".join(cells) + f" | {row['sumr']:.1f} | "
                     + ("–" if mine is None else f"{mine:.1f}") + " | "
                     + ("–" if mine is None else f"{mine - row['sumr']:+.1f}") + f" | {source_text(row)} |")
    return lines + [""]
