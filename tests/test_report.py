"""The report: table numbers are those of metrics.parquet, plots are valid PNGs, notes appear when due."""
from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
from PIL import Image

from leccr.report import CL2CM_NOTE, results_tables, write_report
from schemas.core import validate
from schemas.evaluate import METRICS, WORST_QUERIES


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
        "retrieved_scores": [0.9, 0.8, 0.7]}], schema=WORST_QUERIES)


def table_rows(markdown: str, lang: str) -> dict[str, list[str]]:
    """Row label -> cells of the per-language table of `lang`."""
    section = markdown.split(f"### {lang} (")[1].split("###")[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| Method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_table_numbers_match_metrics_and_layout():
    metrics = make_metrics()
    markdown = results_tables(metrics)
    header = next(line for line in markdown.splitlines() if line.startswith("| Method"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "Method", "T→V R@1", "T→V R@5", "T→V R@10", "V→T R@1", "V→T R@5", "V→T R@10", "SumR", "T→V MedR", "V→T MedR"]
    lookup = {(r["method"], r["score"], r["lang"], r["direction"], r["metric"], r["k"]): r["value"]
              for r in metrics.to_pylist()}
    for lang in ("de", "fr"):
        rows = table_rows(markdown, lang)
        # paper order: baseline, cl2cm, leccr; leccr's fused (alpha 0.9) and global rows both shown;
        # the others have one row (their fused score is the global one)
        assert list(rows) == ["baseline", "cl2cm", "leccr (fused, α=0.9)", "leccr (global only)"]
        for label, (method, score) in {"baseline": ("baseline", "fused"), "leccr (fused, α=0.9)": ("leccr", "fused"),
                                       "leccr (global only)": ("leccr", "global")}.items():
            expected = [lookup[(method, score, lang, d, "recall", k)]
                        for d in ("text_to_visual", "visual_to_text") for k in (1, 5, 10)]
            expected.append(lookup[(method, score, lang, "both", "sumr", None)])
            assert [float(c) for c in rows[label][:7]] == expected
        # by hand: R@K values b+1, b+5, b+10 (T→V) and b+11, b+15, b+20 (V→T) sum to 6b + 62
        assert float(rows["baseline"][6]) == 6 * (30 + (3 if lang == "fr" else 0)) + 62
    # the SumR overview: one column per language
    overview = markdown.split("### SumR per language")[1]
    assert re.search(r"\| leccr \(fused, α=0.9\) \| 302\.0 \| 320\.0 \|", overview)


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
    assert "✓ `img3`: a red circle (0.700)" in text
    assert "- **split**: test (5 visual items)" in text


def test_no_cl2cm_note_without_cl2cm(tmp_path):
    metrics = make_metrics()
    keep = [r for r in metrics.to_pylist() if r["method"] != "cl2cm"]
    text = write_report(tmp_path, pa.Table.from_pylist(keep, schema=METRICS), WORST_QUERIES.empty_table(), {}, {})
    assert CL2CM_NOTE not in text
    assert "_No error analysis" in text
