"""Run records (leccr.records.runs): one file per run, never overwritten; the `runs` and `run_metrics` views."""
import json
from datetime import timedelta

import pyarrow as pa
import pyarrow.parquet as pq

from leccr.config import parse_config
from leccr.records.runs import CACHE_HIT, COMPUTED, RunLabel, StageEntry, now, prunable, read_records, write_record
from leccr.records.sql import connect
from leccr.schemas.evaluate import METRICS


def config(root, name="exp", **sections):
    return parse_config({"name": name, "artifacts_root": str(root),
                         "dataset": {"format": "multi30k", "path": str(root / "data")}, **sections})


def metrics_file(root, key, sumr_by_lang):
    """A metrics.parquet of evaluate/<key> holding one sumr row per language."""
    rows = [{"method": "leccr", "score": "fused", "lang": lang, "direction": "both", "metric": "sumr", "k": None,
             "value": value, "name": f"{lang}/sumr", "split": "test", "n_texts": 10, "n_items": 10, "alpha": 1.0,
             "checkpoint": "t"} for lang, value in sumr_by_lang.items()]
    folder = root / "evaluate" / key
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=METRICS), folder / "metrics.parquet")


def test_each_run_appends_a_record_and_the_views_join_metrics_to_runs(tmp_path):
    started = now()
    for w_d, key, sumr in ((0.1, "a" * 16, 300.0), (0.3, "b" * 16, 310.5)):
        cfg = config(tmp_path, name=f"exp--w_d={w_d}", train={"models": {"leccr": {"losses": {"w_d": w_d}}}})
        metrics_file(tmp_path, key, {"de": sumr, "fr": sumr - 10})
        write_record(cfg, RunLabel("exp", "exp-w_d", f"w_d={w_d}", {"train.models.leccr.losses.w_d": w_d}), started,
                     {"dataset": StageEntry("d" * 16, CACHE_HIT, 0.0), "evaluate": StageEntry(key, COMPUTED, 2.5)},
                     "completed")
    write_record(config(tmp_path), RunLabel("exp"), started, {}, "failed", RuntimeError("boom"))

    records = read_records(tmp_path)
    assert len(records) == 3 and len({r["run_id"] for r in records}) == 3
    failed = [r for r in records if r["outcome"] == "failed"]
    assert len(failed) == 1 and failed[0]["error"] == "RuntimeError: boom"
    by_variant = {r["variant"]: r for r in records}
    assert by_variant["w_d=0.1"]["config"]["train"]["models"]["leccr"]["losses"]["w_d"] == 0.1  # effective config

    con = connect(tmp_path)
    runs = con.execute("SELECT variant, w_d, outcome, config->>'$.name' AS name, stages->>'$.evaluate.status' AS status "
                   "FROM runs ORDER BY ALL").fetchall()
    assert runs == [("w_d=0.1", 0.1, "completed", "exp--w_d=0.1", "computed"),
                    ("w_d=0.3", 0.3, "completed", "exp--w_d=0.3", "computed"),
                    (None, None, "failed", "exp", None)]
    assert con.execute("SELECT typeof(w_d), typeof(started_at) FROM runs LIMIT 1").fetchone() == (
        "DOUBLE", "TIMESTAMP WITH TIME ZONE")
    joined = con.execute("SELECT w_d, lang, value FROM run_metrics WHERE metric = 'sumr' ORDER BY ALL").fetchall()
    assert joined == [(0.1, "de", 300.0), (0.1, "fr", 290.0), (0.3, "de", 310.5), (0.3, "fr", 300.5)]
    # a metrics file no run recorded is not in run_metrics
    metrics_file(tmp_path, "c" * 16, {"de": 1.0})
    assert connect(tmp_path).execute("SELECT count(*) FROM run_metrics").fetchone() == (4,)


def test_inspect_queries_run_metrics_across_runs(tmp_path, capsys):
    from leccr.cli import main

    metrics_file(tmp_path, "a" * 16, {"de": 123.0})
    write_record(config(tmp_path), RunLabel("exp"), now(), {"evaluate": StageEntry("a" * 16, COMPUTED, 1.0)},
                 "completed")
    assert main(["inspect", "--root", str(tmp_path), "--format", "json",
                 "SELECT experiment, lang, value FROM run_metrics"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"experiment": "exp", "lang": "de", "value": 123.0}]
    assert main(["inspect", "--root", str(tmp_path), "--print-sql"]) == 0
    assert "CREATE OR REPLACE VIEW run_metrics" in capsys.readouterr().out


def test_swept_field_names_that_clash_use_the_whole_path(tmp_path):
    label = RunLabel("exp", "s", "v", {"evaluate.alpha": 0.5, "train.seed": 1, "index.seed": 2})
    write_record(config(tmp_path), label, now(), {}, "completed")
    columns = [row[0] for row in connect(tmp_path).execute("DESCRIBE runs").fetchall()]
    # `alpha` is a metrics column and `seed` is swept twice: neither can be a column name of its own
    assert {"evaluate_alpha", "train_seed", "index_seed"} <= set(columns)


def test_old_records_are_prunable(tmp_path):
    path = write_record(config(tmp_path), RunLabel("exp"), now() - timedelta(days=3), {}, "completed",
                        ended=now() - timedelta(days=2))
    write_record(config(tmp_path), RunLabel("exp"), now(), {}, "completed")
    assert prunable(tmp_path, timedelta(days=1)) == [path]
