"""The evaluation report: report.md with the papers' per-language tables, and matplotlib PNGs.

Everything here reads plain tables (leccr.schemas.evaluate.METRICS / WORST_QUERIES, each method's
history.parquet) and writes files; nothing computes scores. The stage passes in what it measured:

    write_report(out_dir, metrics, worst, curves, histories, notes) -> markdown text

`curves[(method, score, lang, direction)]` is recall@K in % for K = 1..len(array).
"""
from __future__ import annotations

import base64
import io
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from leccr.config import method_sort_key
from leccr.core.io import atomic_write_bytes, atomic_write_text

CL2CM_NOTE = ("CL2CM is our reconstruction from the AAAI 2024 paper's description: no code or equations "
              "are public, so its numbers are not the paper's system (see docs/method.md, \"CL2CM\").")
# Method rows in the order the papers print them: the baseline first, the proposed method last.
ARROWS = {"text_to_visual": "T→V", "visual_to_text": "V→T"}


def _rows(metrics: pa.Table) -> list[dict]:
    return metrics.to_pylist()


def _lookup(rows: list[dict]) -> dict[tuple, float]:
    """(method, score, lang, direction, metric, k) -> value."""
    return {(r["method"], r["score"], r["lang"], r["direction"], r["metric"], r["k"]): r["value"] for r in rows}


def _variants(rows: list[dict]) -> list[tuple[str, str]]:
    """(method, score) rows of a table: methods in paper order, the fused score before global-only.

    A method whose fused score is its global score (alpha = 1) gets one row, not two equal ones."""
    alphas = {(r["method"], r["score"]): r["alpha"] for r in rows}
    methods = sorted({m for m, _ in alphas}, key=method_sort_key)
    out = []
    for method in methods:
        if (method, "fused") in alphas:
            out.append((method, "fused"))
        if (method, "global") in alphas and not ((method, "fused") in alphas and alphas[(method, "fused")] == 1.0):
            out.append((method, "global"))
    return out


def _label(method: str, score: str, rows: list[dict]) -> str:
    alpha = next(r["alpha"] for r in rows if r["method"] == method and r["score"] == score)
    if score == "global" and any(r["method"] == method and r["score"] == "fused" and r["alpha"] < 1.0 for r in rows):
        return f"{method} (global only)"
    if score == "fused" and alpha < 1.0:
        return f"{method} (fused, α={alpha:g})"
    return method


def _alpha(method: str, score: str, rows: list[dict]) -> float:
    """The weight of global cosine in this row's score (1 for global only)."""
    return next(r["alpha"] for r in rows if r["method"] == method and r["score"] == score)


def languages_of(rows: list[dict]) -> list[str]:
    langs = sorted({r["lang"] for r in rows})
    return (["en"] if "en" in langs else []) + [lang for lang in langs if lang != "en"]


def results_tables(metrics: pa.Table) -> str:
    """Per language, one markdown table per direction (rows = methods, columns = R@K and MedR: the
    LECCR/CL2CM papers' numbers, narrow enough for the Prefect UI's artifact pane), then a SumR overview
    (rows = methods, columns = languages)."""
    rows = _rows(metrics)
    if not rows:
        return "_No metrics._\n"
    table = _lookup(rows)
    ks = sorted({r["k"] for r in rows if r["metric"] == "recall" and r["k"] is not None and r["direction"] != "both"})
    table_ks = [k for k in ks if k in _table_ks(rows)]
    variants = _variants(rows)
    out: list[str] = []
    for lang in languages_of(rows):
        present = [v for v in variants if (v[0], v[1], lang, "both", "sumr", None) in table]
        if not present:
            continue
        split = next(r["split"] for r in rows if r["lang"] == lang)
        n_texts = next(r["n_texts"] for r in rows if r["lang"] == lang)
        n_items = next(r["n_items"] for r in rows if r["lang"] == lang)
        out.append(f"### {lang} ({split}: {n_items} visual items, {n_texts} captions)\n")
        for direction, arrow in ARROWS.items():
            header = [f"{arrow} ({'text → visual' if direction == 'text_to_visual' else 'visual → text'})", "α"]
            header += [f"R@{k}" for k in table_ks] + ["MedR"]
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
            for method, score in present:
                cells = [_label(method, score, rows), f"{_alpha(method, score, rows):g}"]
                cells += [f"{table[(method, score, lang, direction, 'recall', k)]:.1f}" for k in table_ks]
                cells.append(f"{table[(method, score, lang, direction, 'median_rank', None)]:g}")
                out.append("| " + " | ".join(cells) + " |")
            out.append("")
    langs = languages_of(rows)
    out.append("### SumR per language\n")
    out.append("SumR: the sum of the R@K above, both directions.\n")
    out.append("| Method | " + " | ".join(langs) + " |")
    out.append("|---|" + "|".join(["---:"] * len(langs)) + "|")
    for method, score in variants:
        cells = [_label(method, score, rows)]
        for lang in langs:
            value = table.get((method, score, lang, "both", "sumr", None))
            cells.append("–" if value is None else f"{value:.1f}")
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    return "\n".join(out) + "\n"


def sumr_console_table(metrics: pa.Table) -> str:
    """SumR as a few aligned lines for the console log: one row per method and score, one column per
    language (the full numbers are in report.md and metrics.parquet)."""
    rows = _rows(metrics)
    table = _lookup(rows)
    langs = languages_of(rows)
    labels = {variant: _label(*variant, rows) for variant in _variants(rows)}
    width = max([len("method"), *map(len, labels.values())])
    lines = [f"{'method':<{width}}  " + "  ".join(f"{lang:>7}" for lang in langs)]
    for (method, score), label in labels.items():
        values = [table.get((method, score, lang, "both", "sumr", None)) for lang in langs]
        lines.append(f"{label:<{width}}  " + "  ".join("      –" if v is None else f"{v:7.1f}" for v in values))
    return "\n".join(lines)


def alpha_table(metrics: pa.Table) -> str:
    """SumR per language at every evaluate.alphas weight (rows with score "alpha"), one row per
    (method, α): the papers' α ablation, from one trained model. Empty when no such rows."""
    rows = [r for r in _rows(metrics) if r["score"] == "alpha" and r["metric"] == "sumr"]
    if not rows:
        return ""
    langs = languages_of(rows)
    sumr = {(r["method"], r["alpha"], r["lang"]): r["value"] for r in rows}
    out = ["| Method | α | " + " | ".join(f"{lang} SumR" for lang in langs) + " |",
           "|---|---:|" + "|".join(["---:"] * len(langs)) + "|"]
    for method, alpha in sorted({(m, a) for m, a, _ in sumr}, key=lambda v: (method_sort_key(v[0]), v[1])):
        cells = [f"{sumr[(method, alpha, lang)]:.1f}" if (method, alpha, lang) in sumr else "–" for lang in langs]
        out.append(f"| {method} | {alpha:g} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _table_ks(rows: list[dict]) -> set[int]:
    """The K of the SumR (those every sumr row was made of): recall rows flagged by the stage."""
    return {r["k"] for r in rows if r["metric"] == "recall" and r["k"] is not None}


# ------------------------------------------------------------------------------------- plots
def _figure_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _series_label(method: str, score: str, alphas: Mapping[tuple[str, str], float]) -> str:
    if score == "global":
        return f"{method} (global cosine)"
    alpha = alphas.get((method, score))
    return f"{method} ({score}" + (f", α={alpha:g})" if alpha is not None else ")")


def _k_ticks(largest: int) -> list[int]:
    """K ticks for a log axis that ends at `largest`: 1, 2, 5, 10, 20, 50, ... below it, and it."""
    ticks = [m * 10 ** e for e in range(0, len(str(largest)) + 1) for m in (1, 2, 5) if m * 10 ** e < largest]
    # A tick closer than ~15 % to the end would print on top of the end's label.
    ticks = [t for t in ticks if t == 1 or largest / t > 1.15]
    return ticks + [largest]


def recall_figure(curves: Mapping[tuple[str, str, str, str], np.ndarray], lang: str,
                  alphas: Mapping[tuple[str, str], float] | None = None,
                  sizes: Mapping[tuple[str, str], int] | None = None):
    """Recall@K (%) against K for one language, both directions side by side, one line per
    (method, score): solid for the fused score (α in the legend), dashed for global cosine only.

    `sizes[(lang, direction)]`: how many items (text→visual) or captions (visual→text) a query ranks;
    each panel's K axis ends there (recall is 100 % from then on), or at the longest curve where the
    curves stop before (`evaluate.curve_max_k`), with ticks at 1, 2, 5, 10, ... and the end."""
    plt = _pyplot()
    alphas, sizes = alphas or {}, sizes or {}
    series = sorted({(key[0], key[1]) for key in curves}, key=lambda ms: (method_sort_key(ms[0]), ms[1]))
    # One colour per method, the same in every panel and file.
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = sorted({method for method, _ in series}, key=method_sort_key)
    colour = {method: palette[i % len(palette)] for i, method in enumerate(methods)}
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True, layout="constrained")
    for axis, direction in zip(axes, ARROWS):
        drawn = [curves[key] for key in ((m, s, lang, direction) for m, s in series) if key in curves]
        longest = max((len(values) for values in drawn), default=1)
        size = sizes.get((lang, direction))
        end = min(size, longest) if size else longest  # curves stop at evaluate.curve_max_k
        for method, score in series:
            values = curves.get((method, score, lang, direction))
            if values is None:
                continue
            values = values[:end]
            ks = np.arange(1, len(values) + 1)
            axis.plot(ks, values, label=_series_label(method, score, alphas), color=colour[method],
                      linestyle="--" if score == "global" else "-")
        axis.set_xscale("log")
        if end > 1:
            axis.set_xlim(1, end)
        axis.set_xticks(_k_ticks(end), labels=[str(k) for k in _k_ticks(end)])
        axis.minorticks_off()
        ranked = "items" if direction == "text_to_visual" else "captions"
        axis.set_xlabel(f"K (of {size} {ranked})" if size else "K")
        axis.set_title(f"{lang}: {ARROWS[direction]}")
        axis.grid(True, alpha=0.3)
    axes[0].set_ylabel("recall@K (%)")
    axes[0].set_ylim(0, 100)
    if axes[-1].get_legend_handles_labels()[0]:
        axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, title="score")
    return figure


def plot_recall_curves(curves: Mapping[tuple[str, str, str, str], np.ndarray], out_dir: Path,
                       alphas: Mapping[tuple[str, str], float] | None = None,
                       sizes: Mapping[tuple[str, str], int] | None = None) -> list[Path]:
    """One PNG per language (see recall_figure)."""
    plt = _pyplot()
    paths = []
    for lang in sorted({key[2] for key in curves}):
        figure = recall_figure(curves, lang, alphas, sizes)
        path = out_dir / f"recall_at_k_{lang}.png"
        atomic_write_bytes(path, _figure_png(figure))
        plt.close(figure)
        paths.append(path)
    return paths


def ranked_sizes(metrics: pa.Table) -> dict[tuple[str, str], int]:
    """(lang, direction) -> how many entries a query of that direction ranks: the visual items for
    text→visual, the captions for visual→text (metrics.parquet's n_items / n_texts)."""
    sizes = {}
    for row in metrics.to_pylist():
        sizes[(row["lang"], "text_to_visual")] = row["n_items"]
        sizes[(row["lang"], "visual_to_text")] = row["n_texts"]
    return sizes


def _numeric_columns(history: pa.Table) -> dict[str, np.ndarray]:
    return {name: history.column(name).to_numpy(zero_copy_only=False).astype(float) for name in history.column_names
            if pa.types.is_integer(history.schema.field(name).type)
            or pa.types.is_floating(history.schema.field(name).type)}


def training_figure(method: str, history: pa.Table):
    """Training curves of one method's history.parquet, or None when it has nothing to plot.

    One panel per loss term (each on its own y scale: a 0.005 term next to a 10.0 total would be a
    flat line at zero), one per other column (lr) and, last, one for the validation SumR (overall
    and per language; legend outside the curves). A dotted line marks the step of the best validation SumR
    (the checkpoint kept) in every panel. x: `step`, else `epoch`, else the row number."""
    plt = _pyplot()
    columns = _numeric_columns(history)
    x_name = next((name for name in ("step", "global_step", "epoch") if name in columns), None)
    x = columns.pop(x_name) if x_name else np.arange(history.num_rows, dtype=float)
    for name in ("step", "global_step", "epoch"):
        columns.pop(name, None)
    # Rows of another kind (a validation row has no losses) are NaN in a column: those points are skipped.
    columns = {name: values for name, values in columns.items() if not np.isnan(values).all()}
    losses = sorted((n for n in columns if n.startswith("loss")), key=lambda n: (n != "loss_total", n))
    validation = sorted((n for n in columns if n.startswith("val_")), key=lambda n: (n != "val_sumr", n))
    others = [n for n in columns if n not in losses and n not in validation]
    panels = [(name, [name], "loss") for name in losses]
    panels += [(name, [name], "learning rate" if name == "lr" else name) for name in others]
    if validation:  # last, so its legend (outside, on the right) widens only the last column
        panels.append(("validation SumR", validation, "SumR"))
    if not panels:
        return None
    best_x = best_label = None
    if "val_sumr" in columns:
        values = columns["val_sumr"]
        best = int(np.nanargmax(values))
        best_x = x[best]
        epoch = history.column("epoch")[best].as_py() if "epoch" in history.column_names else None
        best_label = f"best validation SumR {values[best]:.1f}" + (f" (epoch {epoch})" if epoch is not None else "")
    figure, axes = _panel_grid(plt, len(panels))
    for axis, (title, names, ylabel) in zip(axes, panels):
        for name in names:
            values = columns[name]
            keep = ~np.isnan(values)
            axis.plot(x[keep], values[keep], label=name, marker="." if keep.sum() < 30 else None)
        if best_x is not None:
            axis.axvline(best_x, color="grey", linestyle=":", linewidth=1.2, label=best_label)
        axis.set_title(title)
        axis.set_xlabel(x_name or "row")
        axis.set_ylabel(ylabel)
        axis.grid(True, alpha=0.3)
        if len(names) > 1:
            axis.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7)
    figure.suptitle(f"training: {method}" + (f"  (dotted: {best_label})" if best_label else ""))
    return figure


def _panel_grid(plt, count: int, max_cols: int = 3):
    """A figure with exactly `count` panels in balanced rows of up to `max_cols`; the panels of a short
    last row share its whole width (8 panels: 3 + 3 + 2 wider ones), so no cell is left empty."""
    rows = math.ceil(count / max_cols)
    cols = math.ceil(count / rows)  # balanced rows: 4 panels are 2 x 2, not 3 + 1
    last = count - (rows - 1) * cols
    figure = plt.figure(figsize=(4.6 * cols, 3.0 * rows), layout="constrained")
    grid = figure.add_gridspec(rows, cols * last)  # a full row's panel spans `last` cells, a last-row one `cols`
    axes = []
    for index in range(count):
        row, col = divmod(index, cols)
        span = cols if row == rows - 1 else last
        axes.append(figure.add_subplot(grid[row, col * span:(col + 1) * span]))
    return figure, axes


def plot_training_curves(histories: Mapping[str, pa.Table], out_dir: Path) -> list[Path]:
    """One PNG per method (see training_figure)."""
    plt = _pyplot()
    paths = []
    for method, history in sorted(histories.items(), key=lambda item: method_sort_key(item[0])):
        if history.num_rows == 0:
            continue
        figure = training_figure(method, history)
        if figure is None:
            continue
        path = out_dir / f"training_{method}.png"
        atomic_write_bytes(path, _figure_png(figure))
        plt.close(figure)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------- error analysis
def _clip(text: str, limit: int = 120) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


WORST_SHOWN_PER_LANGUAGE = 10  # report.md stays a summary; worst_queries.parquet holds every row


def worst_queries_section(worst: pa.Table, per_language: int = WORST_SHOWN_PER_LANGUAGE) -> str:
    """Per language, one markdown table of the worst-ranked queries (at most `per_language`, worst first,
    over every method, score and direction) and what came back instead.

    Visual items are named by their item id (their only text is an MLLM description, unreadable from
    a small model and not what a reader looks for); captions by id and text. A retrieved entry that
    is a hit is marked ✓ — rare here, since these queries' first hit ranked below what is shown. The
    rest is in worst_queries.parquet (`leccr inspect` view `worst_queries`)."""
    rows = worst.to_pylist()
    if not rows:
        return "_No error analysis (worst_queries is 0)._\n"
    out = []
    by_lang: dict[str, list[dict]] = {}
    for row in rows:
        by_lang.setdefault(row["lang"], []).append(row)
    for lang in languages_of(rows):
        group = sorted(by_lang[lang], key=lambda r: (-r["rank"], method_sort_key(r["method"]), r["score"],
                                                    r["direction"]))
        shown = group[:per_language]
        more = f" (the worst {len(shown)} of {len(group)})" if len(group) > len(shown) else ""
        out.append(f"#### {lang}{more}\n")
        out.append("| method | query | rank of first hit | expected | top retrieved |")
        out.append("|---|---|---:|---|---|")
        for row in shown:
            text_to_visual = row["direction"] == "text_to_visual"
            method = f"{row['method']} ({row['score']}), {ARROWS[row['direction']]}"
            query = f"`{row['query_id']}`" + (f" {_clip(row['query_text'], 80)}" if text_to_visual else "")
            expected = ", ".join(f"`{e}`" for e in row["expected"][:3]) + (" …" if len(row["expected"]) > 3 else "")
            retrieved = "<br>".join(
                f"{'✓ ' if rid in row['expected'] else ''}`{rid}`" + ("" if text_to_visual else f": {_clip(text, 60)}")
                + f" ({score_value:.3f})"
                for rid, text, score_value in zip(row["retrieved_ids"], row["retrieved_texts"], row["retrieved_scores"])
            )
            out.append(f"| {method} | {query} | {row['rank']} | {expected} | {retrieved} |")
        out.append("")
    out.append("Every worst query of every method, score and direction: `worst_queries.parquet` beside this "
               "report, or `leccr inspect \"SELECT * FROM worst_queries WHERE lang = 'de' ORDER BY rank DESC\"`.")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------- the report
def render_report(
    metrics: pa.Table,
    worst: pa.Table,
    plot_paths: Sequence[Path],
    out_dir: Path,
    header: Mapping[str, str] | None = None,
) -> str:
    """The report.md text; plots are linked relative to `out_dir`."""
    rows = metrics.to_pylist()
    methods = sorted({r["method"] for r in rows}, key=method_sort_key)
    lines = ["# Evaluation report", ""]
    for name, value in (header or {}).items():
        lines.append(f"- **{name}**: {value}")
    if header:
        lines.append("")
    lines.append("Recall@K in % (a visual item is found when any of its captions ranks within K; a caption "
                 "when its item does). SumR is the sum of the R@K of both directions. MedR: median rank of "
                 "the first hit, as the papers' evaluation code counts it (floor of the median of 0-based "
                 "ranks, plus 1). The fused score is α·minmax(global) + (1−α)·minmax(slot max), min/max "
                 "over the whole test score matrix; α (its column) = 1 is global cosine only.")
    lines.append("")
    if "cl2cm" in methods:
        lines += [f"> **Note.** {CL2CM_NOTE}", ""]
    lines += ["## Results", "", results_tables(metrics)]
    if alphas := alpha_table(metrics):
        lines += ["## Inference weight α", "",
                  "The fused score of each method with slots at every weight of `evaluate.alphas` "
                  "(the same trained model; SumR).", "", alphas]
    curves = [p for p in plot_paths if p.name.startswith("recall_at_k")]
    training = [p for p in plot_paths if p.name.startswith("training_")]
    if curves:
        lines += ["## Recall@K curves", ""]
        lines += [f"![{p.stem}]({p.relative_to(out_dir).as_posix()})" for p in curves] + [""]
    if training:
        lines += ["## Training curves", ""]
        lines += [f"![{p.stem}]({p.relative_to(out_dir).as_posix()})" for p in training] + [""]
    lines += ["## Worst-ranked queries", "",
              (f"Per language, the {WORST_SHOWN_PER_LANGUAGE} queries whose first hit ranked lowest: what they "
               "expected and what ranked first instead (visual items by item id; ✓ marks a retrieved entry that "
               "is a hit)."), "",
              worst_queries_section(worst)]
    return "\n".join(lines).rstrip() + "\n"


def write_report(
    out_dir: Path,
    metrics: pa.Table,
    worst: pa.Table,
    curves: Mapping[tuple[str, str, str, str], np.ndarray],
    histories: Mapping[str, pa.Table],
    header: Mapping[str, str] | None = None,
) -> str:
    """Write plots/*.png and report.md into `out_dir`; return the markdown."""
    plots = Path(out_dir) / "plots"
    alphas = {(r["method"], r["score"]): r["alpha"] for r in metrics.to_pylist()}
    plot_paths = (plot_recall_curves(curves, plots, alphas, ranked_sizes(metrics))
                  + plot_training_curves(histories, plots))
    text = render_report(metrics, worst, plot_paths, Path(out_dir), header)
    atomic_write_text(Path(out_dir) / "report.md", text)
    return text


_IMAGE_LINK = re.compile(r"!\[(?P<alt>[^\]]*)\]\((?P<target>[^)\s]+)\)")


def embed_images(markdown: str, base_dir: Path) -> str:
    """The markdown with every relative image link replaced by a base64 `data:` URI of the file.

    For the Prefect artifact: the UI shows the markdown away from report.md's folder, where the
    relative `plots/*.png` links of report.md point nowhere."""

    def inline(match: re.Match) -> str:
        target = match["target"]
        if ":" in target.split("/")[0]:  # http:, https:, data: ... already absolute
            return match.group(0)
        data = base64.b64encode((Path(base_dir) / target).read_bytes()).decode("ascii")
        mime = "image/png" if target.lower().endswith(".png") else "image/" + target.rsplit(".", 1)[-1].lower()
        return f"![{match['alt']}](data:{mime};base64,{data})"

    return _IMAGE_LINK.sub(inline, markdown)


def artifact_markdown(report_dir: Path) -> str:
    """report.md of an evaluate artifact, self-contained for a Prefect markdown artifact."""
    return embed_images((Path(report_dir) / "report.md").read_text(encoding="utf-8"), Path(report_dir))
