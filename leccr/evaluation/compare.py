"""`leccr compare`: recorded runs side by side, in the papers' ablation layout.

Reads run records (leccr.records.runs) and each run's evaluate metrics; writes one table, rows = method ×
language × the swept fields (and α, for evaluate.alphas rows), columns = R@K both ways and SumR, then a
plot of SumR against each swept field, as `compare.md` with PNGs. Runs whose effective configs differ
in more than the swept fields are flagged, with the fields named: such a table mixes causes.
Published numbers (leccr.evaluation.published) that match the runs' dataset are listed beside ours, with the
difference. No Prefect here: the sweep flow publishes the same markdown as a Prefect artifact.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from leccr.config import method_sort_key
from leccr.evaluation.report import ARROWS, _figure_png, _pyplot, languages_of
from leccr.records.runs import read_records
from leccr.core.io import atomic_write_bytes, atomic_write_text

IGNORED_FIELDS = ("name", "sweep")  # differ between a sweep's variants by construction


@dataclass
class Comparison:
    title: str
    runs: list[dict[str, Any]]  # the selected run records
    swept: list[str]  # dotted config paths that are the table's own columns
    flagged: dict[str, list[Any]]  # path -> distinct values: differing fields that were not swept
    rows: list[dict[str, Any]]  # one per (run, method, language[, α])
    ks: list[int]
    published: list[dict[str, Any]] = field(default_factory=list)  # leccr.evaluation.published rows matching the runs

    @property
    def columns(self) -> list[str]:
        """The varying fields shown per row: the swept ones, then the flagged ones."""
        return self.swept + [p for p in self.flagged if p not in self.swept]


def select_runs(root: str | Path, run_ids: list[str] | None = None, experiment: str | None = None,
                sweep: str | None = None) -> tuple[str, list[dict[str, Any]]]:
    """(title, records): completed runs with an evaluate stage; for an experiment or a sweep the latest
    run of each variant (of each distinct config, for an experiment's plain runs)."""
    records = [r for r in read_records(root) if r["outcome"] == "completed" and "evaluate" in r["stages"]]
    if run_ids:
        chosen = [r for r in records if any(r["run_id"].startswith(wanted) for wanted in run_ids)]
        missing = [w for w in run_ids if not any(r["run_id"].startswith(w) for r in chosen)]
        if missing:
            raise ValueError(f"no completed run with an evaluate stage has an id starting with {missing}")
        return "runs " + ", ".join(run_ids), chosen
    if sweep is not None:
        chosen, title = [r for r in records if r["sweep"] == sweep], f"sweep {sweep}"
    elif experiment is not None:
        chosen, title = [r for r in records if r["experiment"] == experiment], f"experiment {experiment}"
    else:
        raise ValueError("compare needs run ids, --experiment NAME or --sweep NAME")
    if not chosen:
        known = sorted({r["sweep"] if sweep is not None else r["experiment"] for r in records} - {None})
        raise ValueError(f"no completed run of {title} with an evaluate stage; known: {known}")
    latest: dict[str, dict[str, Any]] = {}
    for record in chosen:  # records are oldest first: the last one of each variant wins
        latest[record["variant"] or json.dumps(record["config"], sort_keys=True)] = record
    return title, list(latest.values())


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted path: leaf value} of a nested config (lists are leaves)."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def _differing(records: list[dict[str, Any]]) -> dict[str, list[Any]]:
    flat = [flatten(r["config"]) for r in records]
    paths = sorted({p for f in flat for p in f if p.split(".")[0] not in IGNORED_FIELDS})
    out = {}
    for path in paths:
        values = [f.get(path) for f in flat]
        distinct = []
        for value in values:
            if value not in distinct:
                distinct.append(value)
        if len(distinct) > 1:
            out[path] = distinct
    return out


def _metrics(root: Path, record: dict[str, Any]) -> list[dict[str, Any]]:
    path = root / "evaluate" / record["stages"]["evaluate"]["key"] / "metrics.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"run {record['run_id']}: {path} is gone (collected by `leccr gc --prune-runs`?)")
    return pq.read_table(path).to_pylist()


def build(root: str | Path, title: str, records: list[dict[str, Any]], score: str = "fused",
          published_file: Path | None = None) -> Comparison:
    """The comparison table of these runs: `score` rows (fused: each method's inference score; global),
    plus every evaluate.alphas row, α as a column; the published rows the runs name (from
    `published_file`, default leccr/evaluation/published_results.yaml) with each row's difference to them."""
    from leccr.evaluation.published import DATA_FILE, matching_rows

    root = Path(root).absolute()
    swept = sorted({path for r in records for path in r.get("swept") or {}})
    differing = _differing(records)
    flagged = {p: v for p, v in differing.items() if p not in swept}
    columns = swept + list(flagged)
    rows: list[dict[str, Any]] = []
    ks: set[int] = set()
    for record in records:
        flat = flatten(record["config"])
        by_variant: dict[tuple, dict[str, Any]] = {}
        for m in _metrics(root, record):
            if m["score"] not in (score, "alpha"):
                continue
            alpha = m["alpha"] if m["score"] == "alpha" else None
            key = (m["method"], m["lang"], alpha)
            row = by_variant.setdefault(key, {"run_id": record["run_id"], "variant": record["variant"],
                                              "method": m["method"], "lang": m["lang"], "alpha": alpha,
                                              **{c: flat.get(c) for c in columns}})
            if m["metric"] == "recall":
                row[(m["direction"], m["k"])] = m["value"]
                ks.add(m["k"])
            elif m["metric"] == "sumr":
                row["sumr"] = m["value"]
        rows.extend(by_variant.values())
    published = []
    for record in records:
        for row in matching_rows(record["config"], published_file or DATA_FILE):
            if row not in published:
                published.append(row)
    for row in rows:
        reference = next((p for p in published if p["method"] == row["method"] and p["lang"] == row["lang"]), None)
        row["published_sumr"] = reference["sumr"] if reference else None
    langs = languages_of(rows) if rows else []
    rows.sort(key=lambda r: (method_sort_key(r["method"]), langs.index(r["lang"]),
                             [json.dumps(r[c], sort_keys=True, default=str) for c in columns],
                             -1.0 if r["alpha"] is None else r["alpha"]))
    return Comparison(title, records, swept, flagged, rows, sorted(ks), published)


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:g}"
    return value if isinstance(value, str) else json.dumps(value)


def table_markdown(comparison: Comparison) -> str:
    from leccr.records.sweep import short_labels

    columns = comparison.columns
    labels = short_labels(columns)
    has_alpha = any(r["alpha"] is not None for r in comparison.rows)
    has_published = any(r["published_sumr"] is not None for r in comparison.rows)
    header = ["Method", "Lang"] + [labels[c] for c in columns] + (["α"] if has_alpha else [])
    header += [f"{ARROWS[d]} R@{k}" for d in ARROWS for k in comparison.ks] + ["SumR"]
    header += ["Δ SumR vs published"] if has_published else []
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * (2 + len(columns) + has_alpha)
                                                              + ["---:"] * (len(header) - 2 - len(columns) - has_alpha)) + "|"]
    for row in comparison.rows:
        cells = [row["method"], row["lang"]] + [_cell(row[c]) for c in columns]
        cells += [_cell(row["alpha"]) if row["alpha"] is not None else "(own)"] if has_alpha else []
        cells += [f"{row[(d, k)]:.1f}" if (d, k) in row else "–" for d in ARROWS for k in comparison.ks]
        cells.append(f"{row['sumr']:.1f}" if "sumr" in row else "–")
        if has_published:
            cells.append("–" if row["published_sumr"] is None or "sumr" not in row
                         else f"{row['sumr'] - row['published_sumr']:+.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_sumr(comparison: Comparison, out_dir: Path) -> list[Path]:
    """One PNG per swept field (and α): SumR against its values, a line per method, language and the
    values of the other varying fields."""
    from leccr.records.sweep import short_labels

    plt = _pyplot()
    fields = list(comparison.columns) + (["alpha"] if any(r["alpha"] is not None for r in comparison.rows) else [])
    labels = short_labels(fields)
    paths = []
    for x_field in fields:
        rows = [r for r in comparison.rows if "sumr" in r and r.get(x_field) is not None]
        values = []
        for r in rows:
            if r[x_field] not in values:
                values.append(r[x_field])
        if len(values) < 2:
            continue
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        order = sorted(values) if numeric else values
        lines: dict[str, dict[Any, float]] = {}
        for r in rows:
            others = ", ".join(f"{labels[f]}={_cell(r.get(f))}" for f in fields if f != x_field and r.get(f) is not None)
            name = f"{r['method']} {r['lang']}" + (f" ({others})" if others else "")
            lines.setdefault(name, {})[json.dumps(r[x_field], default=str)] = r["sumr"]
        figure, axis = plt.subplots(figsize=(6, 4))
        positions = order if numeric else list(range(len(order)))
        for name, points in sorted(lines.items()):
            xs = [p for p, v in zip(positions, order) if json.dumps(v, default=str) in points]
            ys = [points[json.dumps(v, default=str)] for v in order if json.dumps(v, default=str) in points]
            axis.plot(xs, ys, marker="o", label=name)
        if not numeric:
            axis.set_xticks(positions, [_cell(v) for v in order])
        axis.set_xlabel(labels[x_field])
        axis.set_ylabel("SumR")
        axis.set_title(f"SumR against {labels[x_field]}")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
        path = out_dir / f"sumr_vs_{labels[x_field].replace('.', '_')}.png"
        atomic_write_bytes(path, _figure_png(figure))
        plt.close(figure)
        paths.append(path)
    return paths


def markdown(comparison: Comparison, plots: list[Path], out_dir: Path) -> str:
    from leccr.evaluation.published import published_markdown

    lines = [f"# Comparison: {comparison.title}", "",
             f"{len(comparison.runs)} run(s); rows: method × language × "
             + (", ".join(comparison.columns) if comparison.columns else "(nothing varies)")
             + ("; α: evaluate.alphas rows, (own) = the method's own inference weight"
                if any(r["alpha"] is not None for r in comparison.rows) else ""), ""]
    if comparison.flagged:
        lines += ["> **Warning: these runs differ in more than the swept fields**: "
                  + "; ".join(f"`{path}` ({', '.join(_cell(v) for v in values)})"
                              for path, values in comparison.flagged.items())
                  + ". A difference in the table may come from any of them.", ""]
    lines += [table_markdown(comparison)]
    lines += published_markdown(comparison.published,
                                any(r["config"]["evaluate"].get("published") for r in comparison.runs))
    if plots:
        lines += ["## SumR against each swept field", ""]
        lines += [f"![{p.stem}]({p.relative_to(out_dir).as_posix()})" for p in plots] + [""]
    lines += ["## Runs", "", "| run | variant | started | seconds |", "|---|---|---|---:|"]
    lines += [f"| `{r['run_id']}` | {r['variant'] or r['name']} | {r['started_at'][:19]} | {r['seconds']:.0f} |"
              for r in comparison.runs]
    return "\n".join(lines).rstrip() + "\n"


def write(comparison: Comparison, out_dir: str | Path) -> Path:
    """compare.md and its PNGs in `out_dir`; returns the markdown's path."""
    out_dir = Path(out_dir)
    plots = plot_sumr(comparison, out_dir)
    path = out_dir / "compare.md"
    atomic_write_text(path, markdown(comparison, plots, out_dir))
    return path


def default_out_dir(root: str | Path, title: str) -> Path:
    return Path(root) / "compare" / "".join(c if c.isalnum() or c in "-_.=," else "-" for c in title)
