"""The report: table numbers are those of metrics.parquet, plots are valid PNGs, notes appear when due."""
from __future__ import annotations

import base64
import re
from itertools import combinations

import numpy as np
import pyarrow as pa
from PIL import Image

from leccr.evaluation.report import (ARROWS, CL2CM_NOTE, artifact_markdown, recall_figure, results_tables, sumr_console_table,
                          training_figure, worst_queries_section, write_report)
from leccr.schemas.core import validate
from leccr.schemas.evaluate import METRICS, WORST_QUERIES


def metric_rows(method: str, score: str, lang: str, alpha: float, base: float) -> list[dict]:
    """Recall rows that differ by method/lang, with their SumR, mean and median ranks."""
    common = {"method": method, "score": score, "lang": lang, "split": "test", "n_texts": 10, "n_items": 5,
              "alpha": alpha, "checkpoint": "abc"}
    rows, sumr = [], 0.0
    for d_index, direction in enumerate(("text_to_visual", "visual_to_text")):
        for k in (1, 5, 10):
            value = base + 10 * d_index + k
            sumr += value
            rows.append({**common, "direction": direction, "metric": "recall", "k": k, "value": value,
                         "name": f"{lang}/{direction}_R@{k}"})
        rows.append({**common, "direction": direction, "metric": "mean_rank", "k": None, "value": 2.5,
                     "name": f"{lang}/{direction}_mean_rank"})
        rows.append({**common, "direction": direction, "metric": "median_rank", "k": None, "value": 2.0 + d_index,
                     "name": f"{lang}/{direction}_median_rank"})
    rows.append({**common, "direction": "both", "metric": "sumr", "k": None, "value": sumr, "name": f"{lang}/sumr"})
    return rows


def make_metrics() -> pa.Table:
    rows = []
    for lang, offset in (("de", 0.0), ("fr", 3.0)):
        rows += metric_rows("leccr", "fused", lang, 0.9, 40.0 + offset)
        rows += metric_rows("leccr", "global", lang, 1.0, 35.0 + offset)
        rows += metric_rows("baseline", "fused", lang, 1.0, 30.0 + offset)
        rows += metric_rows("baseline", "global", lang, 1.0, 30.0 + offset)
        rows += metric_rows("cl2cm", "fused", lang, 1.0, 32.5 + offset)
        rows += metric_rows("cl2cm", "global", lang, 1.0, 32.5 + offset)
    return validate(pa.Table.from_pylist(rows, schema=METRICS), METRICS, "test")


def make_worst() -> pa.Table:
    return pa.Table.from_pylist([{
        "method": "leccr", "score": "fused", "lang": "de", "direction": "text_to_visual", "query_id": "c7",
        "query_text": "ein roter Kreis | links", "rank": 4, "expected": ["img3"],
        "retrieved_ids": ["img1", "img2", "img3"], "retrieved_texts": ["a blue square", "a green dot", "a red circle"],
        "retrieved_scores": [0.9, 0.8, 0.7]}, {
        "method": "leccr", "score": "fused", "lang": "de", "direction": "visual_to_text", "query_id": "img3",
        "query_text": "[objects] a red circle", "rank": 5, "expected": ["c7"],
        "retrieved_ids": ["c1", "c2"], "retrieved_texts": ["ein Quadrat", "ein Stern"],
        "retrieved_scores": [0.6, 0.5]}], schema=WORST_QUERIES)


def table_rows(markdown: str, lang: str, direction: str) -> tuple[list[str], dict[str, list[str]]]:
    """(header, row label -> cells) of the table of one language and direction."""
    section = markdown.split(f"### {lang} (")[1].split("###")[0]
    table = next(block for block in section.split("\n\n") if block.startswith(f"| {ARROWS[direction]} ("))
    lines = table.strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return header, rows


def test_table_numbers_match_metrics_and_layout():
    metrics = make_metrics()
    markdown = results_tables(metrics)
    lookup = {(r["method"], r["score"], r["lang"], r["direction"], r["metric"], r["k"]): r["value"]
              for r in metrics.to_pylist()}
    for lang in ("de", "fr"):
        for direction in ("text_to_visual", "visual_to_text"):
            header, rows = table_rows(markdown, lang, direction)
            # one table per direction: six columns, narrow enough for the Prefect UI's artifact pane
            assert header[1:] == ["α", "R@1", "R@5", "R@10", "MedR"]
            # paper order: baseline, cl2cm, leccr; leccr's fused (alpha 0.9) and global rows both shown;
            # the others have one row (their fused score is the global one)
            assert list(rows) == ["baseline", "cl2cm", "leccr (fused, α=0.9)", "leccr (global only)"]
            for label, (method, score) in {"baseline": ("baseline", "fused"),
                                           "leccr (fused, α=0.9)": ("leccr", "fused"),
                                           "leccr (global only)": ("leccr", "global")}.items():
                expected = [lookup[(method, score, lang, direction, "recall", k)] for k in (1, 5, 10)]
                expected.append(lookup[(method, score, lang, direction, "median_rank", None)])
                assert float(rows[label][0]) == (0.9 if label == "leccr (fused, α=0.9)" else 1.0)
                assert [float(c) for c in rows[label][1:]] == expected
    # the SumR overview: one column per language; by hand: R@K values b+1, b+5, b+10 (T→V) and b+11,
    # b+15, b+20 (V→T) sum to 6b + 62
    overview = markdown.split("### SumR per language")[1]
    assert re.search(r"\| leccr \(fused, α=0\.9\) \| 302\.0 \| 320\.0 \|", overview)
    assert re.search(r"\| baseline \| 242\.0 \| 260\.0 \|", overview)
    assert max(len(line) for line in markdown.splitlines()) < 80


def test_console_summary_is_a_short_table():
    text = sumr_console_table(make_metrics())
    lines = text.splitlines()
    assert lines[0].split() == ["method", "de", "fr"]
    assert lines[1].split() == ["baseline", "242.0", "260.0"]
    assert len(lines) == 5 and max(len(line) for line in lines) < 60 and "{" not in text


def test_report_files_plots_and_notes(tmp_path):
    metrics, worst = make_metrics(), make_worst()
    curves = {("leccr", "fused", "de", d): np.linspace(10, 90, 20) for d in ("text_to_visual", "visual_to_text")}
    curves[("baseline", "fused", "de", "text_to_visual")] = np.linspace(5, 80, 20)
    histories = {
        "leccr": pa.table({"step": [1, 2, 3, 4], "epoch": [0, 0, 1, 1], "loss_total": [3.0, 2.5, 2.0, 1.8],
                           "loss_vs": [1.0, 0.9, 0.8, 0.7], "val_sumr": [float("nan"), 40.0, float("nan"), 55.0]}),
        "baseline": pa.table({"step": [1, 2], "loss_total": [2.0, 1.0]}),
    }
    text = write_report(tmp_path, metrics, worst, curves, histories, {"split": "test (5 visual items)"})
    assert (tmp_path / "report.md").read_text() == text
    for name in ("recall_at_k_de.png", "training_leccr.png", "training_baseline.png"):
        path = tmp_path / "plots" / name
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 200 and image.size[1] > 100
        assert f"(plots/{name})" in text
    assert CL2CM_NOTE in text
    assert "`c7` ein roter Kreis \\| links" in text  # pipes escaped so the table stays a table
    # visual items by id, not by their (MLLM description) text; the hit among them marked
    assert ("| leccr (fused), T→V | `c7` ein roter Kreis \\| links | 4 | `img3` | "
            "`img1` (0.900)<br>`img2` (0.800)<br>✓ `img3` (0.700) |") in text
    assert "| leccr (fused), V→T | `img3` | 5 | `c7` | `c1`: ein Quadrat (0.600)<br>`c2`: ein Stern (0.500) |" in text
    assert text.index("`img3` | 5 |") < text.index("`c7` ein roter")  # worst first
    assert "a blue square" not in text and "[objects]" not in text
    assert "- **split**: test (5 visual items)" in text


def test_no_cl2cm_note_without_cl2cm(tmp_path):
    metrics = make_metrics()
    keep = [r for r in metrics.to_pylist() if r["method"] != "cl2cm"]
    text = write_report(tmp_path, pa.Table.from_pylist(keep, schema=METRICS), WORST_QUERIES.empty_table(), {}, {})
    assert CL2CM_NOTE not in text
    assert "_No error analysis" in text


def test_report_artifact_markdown_embeds_every_image(tmp_path):
    """The Prefect UI shows the artifact away from report.md's folder: no relative image links."""
    curves = {("leccr", "fused", "de", d): np.linspace(10, 90, 20) for d in ("text_to_visual", "visual_to_text")}
    histories = {"leccr": pa.table({"step": [1, 2], "loss_total": [2.0, 1.0]})}
    report = write_report(tmp_path, make_metrics(), make_worst(), curves, histories)
    assert "](plots/recall_at_k_de.png)" in report  # report.md itself links the files beside it
    markdown = artifact_markdown(tmp_path)
    links = re.findall(r"!\[[^\]]*\]\(([^)]*)\)", markdown)
    assert len(links) == 2 and all(link.startswith("data:image/png;base64,") for link in links)
    assert base64.b64decode(links[0].split(",", 1)[1]) == (tmp_path / "plots" / "recall_at_k_de.png").read_bytes()
    assert markdown.replace(links[0], "").replace(links[1], "") == report.replace(
        "plots/recall_at_k_de.png", "").replace("plots/training_leccr.png", "")


def realistic_history(epochs: int = 6, steps: int = 10) -> pa.Table:
    """A LECCR history as the train stage writes it: train rows with ten loss terms (loss_dstl ~0.005)
    and the lr, one validation row per epoch with SumR overall and per language (best: epoch 4)."""
    rng = np.random.default_rng(0)
    terms = ["loss_c", "loss_c_s", "loss_c_t", "loss_cv", "loss_dstl", "loss_reg", "loss_st", "loss_total",
             "loss_vs", "loss_vt"]
    val_sumr = [150.0, 180.0, 210.0, 260.0, 240.0, 230.0]
    rows = []
    for epoch in range(1, epochs + 1):
        for i in range(steps):
            step = (epoch - 1) * steps + i + 1
            row = {"kind": "train", "step": step, "epoch": epoch, "lr": 1e-5 * step / (epochs * steps)}
            row.update({t: (0.005 if t == "loss_dstl" else 10.0) / (1 + 0.1 * step) * (1 + 0.01 * rng.random())
                        for t in terms})
            rows.append(row)
        rows.append({"kind": "val", "step": epoch * steps, "epoch": epoch, "val_sumr": val_sumr[epoch - 1],
                     **{f"val_sumr_{lang}": val_sumr[epoch - 1] + d for lang, d in (("de", 5), ("fr", -5))}})
    names = ["kind", "step", "epoch", "lr", *terms, "val_sumr", "val_sumr_de", "val_sumr_fr"]
    return pa.table({n: [r.get(n) for r in rows] for n in names})


def test_training_plot_keeps_labels_apart_and_marks_the_best_epoch():
    figure = training_figure("leccr", realistic_history())
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    axes = [axis for axis in figure.axes if axis.axison]
    assert len(axes) == 12  # ten loss terms, validation SumR, lr
    # Everything an axis draws (title, x/y labels, tick labels, legend): no two axes overlap, so no
    # x-label runs into the title of the panel below it.
    boxes = [axis.get_tightbbox(renderer) for axis in axes]
    for (i, a), (j, b) in combinations(enumerate(boxes), 2):
        assert not a.overlaps(b), f"{axes[i].get_title()} overlaps {axes[j].get_title()}"
    by_title = {axis.get_title(): axis for axis in axes}
    dstl = by_title["loss_dstl"]
    low, high = dstl.get_ylim()
    assert high < 0.01  # its own scale: the ~0.005 term is not a flat line at zero
    validation = by_title["validation SumR"]
    legend = validation.get_legend()
    assert legend is not None and not legend.get_window_extent(renderer).overlaps(validation.bbox)  # outside the curves
    for axis in axes:
        assert axis.get_ylabel() and axis.get_xlabel() == "step"
        marker = [line for line in axis.get_lines() if line.get_linestyle() == ":"]
        assert len(marker) == 1 and marker[0].get_xdata()[0] == 40  # epoch 4's validation step
    assert "epoch 4" in figure._suptitle.get_text()


def test_recall_plot_says_which_score_each_line_is():
    curves = {("leccr", "fused", "de", d): np.linspace(10, 90, 20) for d in ("text_to_visual", "visual_to_text")}
    curves.update({("leccr", "global", "de", d): np.linspace(5, 80, 20) for d in ("text_to_visual", "visual_to_text")})
    figure = recall_figure(curves, "de", {("leccr", "fused"): 0.9, ("leccr", "global"): 1.0})
    labels = [text.get_text() for text in figure.axes[-1].get_legend().get_texts()]
    assert labels == ["leccr (fused, α=0.9)", "leccr (global cosine)"]


def test_worst_queries_are_capped_per_language_worst_first():
    rows = [{"method": method, "score": "fused", "lang": lang, "direction": "text_to_visual", "query_id": f"c{i}",
             "query_text": f"query {i}", "rank": 2 + (i * 7) % 23, "expected": ["img1"], "retrieved_ids": ["img2"],
             "retrieved_texts": ["-"], "retrieved_scores": [0.5]}
            for lang in ("de", "zh") for method in ("baseline", "leccr") for i in range(9)]
    text = worst_queries_section(pa.Table.from_pylist(rows, schema=WORST_QUERIES))
    for lang in ("de", "zh"):
        section = text.split(f"#### {lang}")[1].split("####")[0]
        assert section.startswith(" (the worst 10 of 18)")
        ranks = [int(line.split("|")[3]) for line in section.splitlines() if line.startswith("| ") and "`c" in line]
        assert len(ranks) == 10 and ranks == sorted(ranks, reverse=True)
        assert ranks[0] == max(r["rank"] for r in rows if r["lang"] == lang)
    assert "worst_queries.parquet" in text and "FROM worst_queries" in text


def test_recall_axes_end_at_the_collection_size_with_readable_ticks():
    # as evaluate computes them: to the number ranked (17 items, 85 captions), at most curve_max_k
    curves = {("leccr", "fused", "de", "text_to_visual"): np.linspace(10, 100, 17),
              ("leccr", "fused", "de", "visual_to_text"): np.linspace(10, 100, 85)}
    figure = recall_figure(curves, "de", sizes={("de", "text_to_visual"): 17, ("de", "visual_to_text"): 85})
    t2v, v2t = figure.axes[:2]
    assert t2v.get_xlim() == (1, 17) and v2t.get_xlim() == (1, 85)
    assert [int(x) for x in t2v.get_xticks()] == [1, 2, 5, 10, 17]
    assert [int(x) for x in v2t.get_xticks()] == [1, 2, 5, 10, 20, 50, 85]
    assert [t.get_text() for t in v2t.get_xticklabels()] == ["1", "2", "5", "10", "20", "50", "85"]
    assert t2v.get_xlabel() == "K (of 17 items)" and v2t.get_xlabel() == "K (of 85 captions)"
    # a collection larger than the curves (curve_max_k): the axis ends where they do, not past them
    curves = {("leccr", "fused", "de", d): np.linspace(1, 60, 100) for d in ("text_to_visual", "visual_to_text")}
    figure = recall_figure(curves, "de", sizes={("de", "text_to_visual"): 1000, ("de", "visual_to_text"): 5000})
    assert figure.axes[0].get_xlim() == (1, 100) and figure.axes[0].get_xlabel() == "K (of 1000 items)"


def test_training_figure_has_no_empty_panel():
    """Four panels (e.g. CL2CM's losses, lr and validation) were a 2 x 3 grid with an empty column."""
    history = pa.table({"step": [1, 2, 3], "loss_total": [3.0, 2.0, 1.0], "loss_cl": [1.0, 0.8, 0.7],
                        "lr": [1e-5, 2e-5, 3e-5], "val_sumr": [float("nan"), 50.0, 60.0]})
    figure = training_figure("cl2cm", history)
    assert len(figure.axes) == 4 and all(axis.get_lines() for axis in figure.axes)
    left = sorted({round(axis.get_position().x0, 2) for axis in figure.axes})
    assert len(left) == 2  # two columns of two, none left empty
    # eight panels: 3 + 3 + 2, the last two sharing the whole width; labels of rows kept apart
    history = pa.table({"step": [1, 2, 3], **{f"loss_{n}": [3.0, 2.0, 1.0] for n in "abcdef"},
                        "lr": [1e-5, 2e-5, 3e-5]})
    figure = training_figure("cl2cm", history)
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    assert len(figure.axes) == 7
    boxes = [axis.get_tightbbox(renderer) for axis in figure.axes]
    for a, b in combinations(boxes, 2):
        assert not a.overlaps(b)
    last_row = [axis for axis in figure.axes if axis.get_position().y0 < 0.2]
    assert len(last_row) == 1 and last_row[0].get_position().width > 0.6  # one panel, the whole width
