"""`leccr compare` on hand-made run records: the table against the per-run metrics, runs that differ in
more than the swept fields flagged, α rows, and published numbers rendered beside ours for a preset."""
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from leccr.evaluation.compare import build, select_runs, write
from leccr.config import parse_config
from leccr.evaluation.published import matching_rows, published_markdown, rows_named
from leccr.records.runs import COMPUTED, RunLabel, StageEntry, now, write_record
from leccr.schemas.evaluate import METRICS

REPO = Path(__file__).parents[1]


def metric_rows(method, lang, score, alpha, recall_t2v, recall_v2t):
    common = {"method": method, "score": score, "lang": lang, "split": "test", "n_texts": 5, "n_items": 5,
              "alpha": alpha, "checkpoint": "t"}
    rows = [{**common, "direction": d, "metric": "recall", "k": k, "value": v, "name": f"{lang}/{d}_R@{k}"}
            for d, values in (("text_to_visual", recall_t2v), ("visual_to_text", recall_v2t))
            for k, v in zip((1, 5, 10), values)]
    rows.append({**common, "direction": "both", "metric": "sumr", "k": None, "value": sum(recall_t2v) + sum(recall_v2t),
                 "name": f"{lang}/sumr"})
    return rows


def record(root: Path, key: str, rows: list[dict], variant: str, swept: dict, **sections):
    folder = root / "evaluate" / key
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=METRICS), folder / "metrics.parquet")
    cfg = parse_config({"name": f"exp--{variant}", "artifacts_root": str(root),
                        "dataset": {"format": "multi30k", "path": str(root / "data"), "languages": ["de"]}, **sections})
    write_record(cfg, RunLabel("exp", "s", variant, swept), now(), {"evaluate": StageEntry(key, COMPUTED, 1.0)},
                 "completed")


def test_table_holds_each_runs_metrics_and_flags_unswept_differences(tmp_path):
    record(tmp_path, "a" * 16, metric_rows("leccr", "de", "fused", 1.0, [10, 20, 30], [11, 21, 31])
           + metric_rows("leccr", "de", "alpha", 0.5, [1, 2, 3], [4, 5, 6])
           + metric_rows("leccr", "de", "global", 1.0, [0, 0, 0], [0, 0, 0]),
           "w_d=0.1", {"train.models.leccr.losses.w_d": 0.1},
           train={"models": {"leccr": {"losses": {"w_d": 0.1}}}, "seed": 1}, evaluate={"alphas": [0.5]})
    record(tmp_path, "b" * 16, metric_rows("leccr", "de", "fused", 1.0, [12, 22, 32], [13, 23, 33]),
           "w_d=0.3", {"train.models.leccr.losses.w_d": 0.3},
           train={"models": {"leccr": {"losses": {"w_d": 0.3}}}, "seed": 2})
    title, records = select_runs(tmp_path, sweep="s")
    comparison = build(tmp_path, title, records)
    assert comparison.swept == ["train.models.leccr.losses.w_d"]
    assert comparison.flagged == {"evaluate.alphas": [[0.5], []], "train.seed": [1, 2]}
    table = {(r["train.models.leccr.losses.w_d"], r["alpha"]): r for r in comparison.rows}
    assert set(table) == {(0.1, None), (0.1, 0.5), (0.3, None)}  # global rows are not the fused table
    assert table[(0.1, None)]["sumr"] == 123 and table[(0.1, 0.5)]["sumr"] == 21 and table[(0.3, None)]["sumr"] == 135
    assert table[(0.3, None)][("visual_to_text", 5)] == 23
    text = write(comparison, tmp_path / "out").read_text()
    assert "differ in more than the swept fields" in text and "`train.seed` (1, 2)" in text
    lines = [line for line in text.splitlines() if line.startswith("| leccr |")]
    assert "| leccr | de | 0.1 | [0.5] | 1 | (own) | 10.0 | 20.0 | 30.0 | 11.0 | 21.0 | 31.0 | 123.0 |" in lines
    assert "| leccr | de | 0.1 | [0.5] | 1 | 0.5 | 1.0 | 2.0 | 3.0 | 4.0 | 5.0 | 6.0 | 21.0 |" in lines
    assert (tmp_path / "out" / "sumr_vs_w_d.png").is_file()
    with pytest.raises(ValueError, match="known"):
        select_runs(tmp_path, sweep="nope")


@pytest.fixture
def published_fixture(tmp_path) -> Path:
    """A published-numbers file in the repository's format with one made-up row (a rendering fixture,
    not a paper's number)."""
    path = tmp_path / "published.yaml"
    path.write_text(yaml.safe_dump({
        "papers": {"paper-x": {"title": "A Fixture Paper", "venue": "Fixture 2024", "url": "https://example.org"}},
        "rows": [{"id": "paper-x/t1/multi30k-de/leccr", "paper": "paper-x", "table": "Table 1", "row": "Ours",
                  "method": "leccr", "dataset": "multi30k", "lang": "de", "split": "test",
                  "recall": {"text_to_visual": [10.0, 20.0, 30.0], "visual_to_text": [11.0, 21.0, 31.0]},
                  "sumr": 123.0}]}))
    return path


def test_published_row_renders_beside_ours_for_a_preset(tmp_path, published_fixture):
    preset = yaml.safe_load((REPO / "configs" / "multi30k_de.yaml").read_text())
    preset.setdefault("evaluate", {})["published"] = ["paper-x/t1/multi30k-de/leccr"]
    rows = matching_rows(preset, published_fixture)
    assert [r["row"] for r in rows] == ["Ours"]
    text = "\n".join(published_markdown(rows, True, {("leccr", "de"): 130.5}))
    assert ("| leccr | de | 10.0 | 20.0 | 30.0 | 11.0 | 21.0 | 31.0 | 123.0 | 130.5 | +7.5 | "
            "A Fixture Paper (Fixture 2024), Table 1, row \"Ours\" |") in text
    # the demo's data is another dataset's format only in name: a row for another language matches nothing
    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    assert matching_rows(demo, published_fixture) == []
    assert "names none" in "\n".join(published_markdown([], False))
    preset["dataset"]["languages"] = ["fr"]
    assert matching_rows(preset, published_fixture) == []


def test_compare_shows_the_difference_to_published_numbers(tmp_path, published_fixture):
    record(tmp_path, "a" * 16, metric_rows("leccr", "de", "fused", 1.0, [12, 22, 32], [13, 23, 33]), "v", {})
    title, records = select_runs(tmp_path, sweep="s")
    records[0]["config"]["evaluate"]["published"] = ["paper-x/t1/multi30k-de/leccr"]
    comparison = build(tmp_path, title, records, published_file=published_fixture)
    text = write(comparison, tmp_path / "out").read_text()
    assert "Δ SumR vs published" in text and "| 135.0 | +12.0 |" in text
    assert "A Fixture Paper (Fixture 2024), Table 1" in text


def test_unknown_published_row_is_a_config_error():
    with pytest.raises(ValueError, match="unknown row"):
        rows_named(["no-such-row"])


PRESET_ROWS = {"multi30k_de": ("de", 450.7), "multi30k_fr": ("fr", 452.9), "multi30k_cs": ("cs", 438.7),
               "vatex_zh": ("zh", 366.5), "msrvtt_cn": ("zh", 307.3)}


@pytest.mark.parametrize("preset_name", sorted(PRESET_ROWS))
def test_benchmark_presets_name_nrccrs_published_row(preset_name):
    """Each benchmark preset names NRCCR's row for its dataset and language, read from the authors' README
    at the commit that still holds the tables."""
    preset = yaml.safe_load((REPO / "configs" / f"{preset_name}.yaml").read_text())
    parse_config(preset)  # evaluate.published is checked against the file
    rows = matching_rows(preset)
    lang, sumr = PRESET_ROWS[preset_name]
    assert [(r["method"], r["lang"], r["sumr"]) for r in rows] == [("nrccr", lang, sumr)]
    assert rows[0]["source"]["repository"] == "LiJiaBei-7/nrccr"
    assert rows[0]["source"]["commit"] == "a7220f27b909e60f9a92583d3e4b0cf87e0ffc1f"
    assert "LiJiaBei-7/nrccr@a7220f27b909 README.md" in "\n".join(published_markdown(rows, True))


def test_vatex_row_sums_within_rounding():
    """VATEX's published parts add to 366.6 against a published SumR of 366.5: rounding, not a typo."""
    row = rows_named(["nrccr-readme/expected-performance/vatex-zh/nrccr"])[0]
    assert sum(sum(v) for v in row["recall"].values()) == pytest.approx(366.6)
    assert row["medr"] == {"text_to_visual": 3.0, "visual_to_text": 2.0}


def _one_row_file(tmp_path, sumr, source_extra=None):
    source = {"title": "T", "venue": "V", "url": "https://example.org", **(source_extra or {})}
    path = tmp_path / f"published-{sumr}.yaml"
    path.write_text(yaml.safe_dump({"papers": {"p": source}, "rows": [{
        "id": "p/t/multi30k-de/x", "paper": "p", "table": "t", "row": "r", "method": "x", "dataset": "multi30k",
        "lang": "de", "recall": {"text_to_visual": [10.0, 20.0, 30.0], "visual_to_text": [10.0, 20.0, 30.0]},
        "sumr": sumr}]}))
    return path


def test_sum_check_allows_one_decimal_rounding_and_no_more(tmp_path):
    """Six parts and the sum each rounded to 0.1 can disagree by up to 0.35; a 0.5 gap is a transcription error."""
    from leccr.evaluation.published import load

    assert load(_one_row_file(tmp_path, 119.7))["p/t/multi30k-de/x"]["sumr"] == 119.7  # parts add to 120.0
    assert load(_one_row_file(tmp_path, 120.3))
    with pytest.raises(ValueError, match="sum to 120.0, not its SumR 119.5"):
        load(_one_row_file(tmp_path, 119.5))


def test_repository_source_needs_its_commit(tmp_path):
    from leccr.evaluation.published import load

    with pytest.raises(ValueError, match="full commit"):
        load(_one_row_file(tmp_path, 120.0, {"repository": "o/r", "commit": "main", "file": "README.md"}))
