"""`leccr sweep` on the demo, on CPU: a 2×2 grid as one drive, shared stages computed once (read from
the run records), every variant's metrics in `run_metrics`, a rerun that computes nothing, `compare`."""

import re
import shlex
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from leccr.cli import main
from leccr.records.runs import CACHE_HIT, COMPUTED, SHARED, read_records
from leccr.records.sql import connect
from leccr.records.sweep import load_sweep, parse_grid

SHARED_STAGES = ("dataset", "translate", "describe", "visual", "features")
GRID = {"train.models.leccr.losses.w_d": [0.1, 0.3], "evaluate.alpha": [0.5, 1.0]}


@pytest.fixture
def sweep_config(demo_config):
    """The demo with LECCR alone for 2 epochs, and a 2×2 sweep block: a train field × an evaluate field."""
    path, artifacts = demo_config
    data = yaml.safe_load(path.read_text())
    data["train"].update(methods=["leccr"], epochs=2, early_stopping_patience=None)
    data["sweep"] = {"name": "demo-2x2", "grid": GRID}
    path.write_text(yaml.safe_dump(data))
    return path, artifacts


def test_grid_expands_into_named_variants(sweep_config):
    path, _ = sweep_config
    sweep = load_sweep(path, parse_grid(["train.models.leccr.num_slots=[1,2]", "train.seed=[1,2,3]"]), "s")
    assert [v.name for v in sweep.variants][:2] == ["num_slots=1,seed=1", "num_slots=1,seed=2"]
    assert len(sweep.variants) == 6 and sweep.variants[4].cfg.train.seed == 2
    assert sweep.variants[4].cfg.name == "demo--num_slots=2,seed=2"
    with pytest.raises(ValueError, match="losses.w_x"):  # a bad path fails before anything runs, named
        load_sweep(path, {"train.models.leccr.losses.w_x": [1]})


@pytest.mark.slow(seconds=60)
def test_demo_sweep_2x2_shares_stages_and_lands_in_run_metrics(sweep_config, capsys):
    path, artifacts = sweep_config
    assert main(["sweep", "--config", str(path), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "Sweep demo-2x2: 4 runs" in plan
    # (the grid's order is the file's: safe_dump wrote its keys sorted)
    variant = plan.split("  alpha=0.5,w_d=0.1")[1].split("  alpha=0.5,w_d=0.3")[0]
    assert "shared by all runs" in next(line for line in variant.splitlines() if line.strip().startswith("features"))
    assert "shared with alpha=1.0,w_d=0.1" in next(
        line for line in variant.splitlines() if line.strip().startswith("train")
    )
    assert "this run only" in next(line for line in variant.splitlines() if line.strip().startswith("evaluate"))
    # one column of keys, however long a stage's label (`train[leccr]` is longer than `dataset`)
    stage_lines = [line for line in variant.splitlines() if line.startswith("    ")]
    assert len({re.search(r" ([0-9a-f]{16}|-{16})  ", line).start() for line in stage_lines}) == 1, variant

    assert main(["sweep", "--config", str(path)]) == 0
    records = [r for r in read_records(artifacts) if r["sweep"] == "demo-2x2"]
    assert len(records) == 4 and {r["outcome"] for r in records} == {"completed"}
    assert {r["variant"] for r in records} == {
        "alpha=0.5,w_d=0.1",
        "alpha=1.0,w_d=0.1",
        "alpha=0.5,w_d=0.3",
        "alpha=1.0,w_d=0.3",
    }
    # its closing hints work as printed (this root is not the default one: they name it)
    hints = [
        line.split(": ", 1)[1]
        for line in capsys.readouterr().out.splitlines()
        if line.startswith(("Compare them: ", "Or in SQL: "))
    ]
    assert len(hints) == 2 and all(f"--root {artifacts}" in hint for hint in hints), hints
    for hint in hints:
        assert main(shlex.split(hint)[1:]) == 0, hint
    assert "demo-2x2" in capsys.readouterr().out

    def computed_once(stage: str, distinct: int) -> None:
        by_key: dict[str, list[str]] = {}
        for record in records:
            entry = record["stages"][stage]
            by_key.setdefault(entry["key"], []).append(entry["status"])
        assert len(by_key) == distinct, (stage, by_key)
        for statuses in by_key.values():  # each key computed by one run; the others shared its task
            assert sorted(statuses) == sorted([COMPUTED] + [SHARED] * (len(statuses) - 1)), (stage, statuses)

    for stage in SHARED_STAGES:
        computed_once(stage, 1)
    computed_once("train[leccr]", 2)  # one per w_d: evaluate.alpha does not change the model
    computed_once("evaluate", 4)
    computed_once("index", 2)

    con = connect(artifacts)
    rows = con.execute(
        "SELECT variant, w_d, alpha, lang, value FROM run_metrics WHERE sweep = 'demo-2x2' "
        "AND metric = 'sumr' AND score = 'fused' ORDER BY ALL"
    ).fetchall()
    assert {(r[1], r[2]) for r in rows} == {(0.1, 0.5), (0.1, 1.0), (0.3, 0.5), (0.3, 1.0)}
    for record in records:  # each variant's rows are its own evaluate artifact's
        metrics = pq.read_table(artifacts / "evaluate" / record["stages"]["evaluate"]["key"] / "metrics.parquet")
        own = {(m["lang"], m["value"]) for m in metrics.to_pylist() if m["metric"] == "sumr" and m["score"] == "fused"}
        assert {(r[3], r[4]) for r in rows if r[0] == record["variant"]} == own

    # compare: the table's SumR per variant and language is run_metrics'
    out = artifacts.parent / "compare"
    assert main(["compare", "--sweep", "demo-2x2", "--root", str(artifacts), "--out", str(out)]) == 0
    text = (out / "compare.md").read_text()
    assert "Warning" not in text  # the variants differ in the swept fields only
    table = [line for line in text.splitlines() if line.startswith("| leccr |")]
    assert len(table) == 4 * 4  # 4 variants × en, de, fr, zh
    for variant, w_d, alpha, lang, value in rows:
        assert any(
            f"| leccr | {lang} | {alpha:g} | {w_d:g} |" in line and line.split("|")[-2].strip() == f"{value:.1f}"
            for line in table
        ), (variant, lang, value)
    assert (out / "sumr_vs_w_d.png").is_file() and (out / "sumr_vs_alpha.png").is_file()
    assert "No published numbers match" in text  # the demo names none, and says so; so does its report
    report = artifacts / "evaluate" / records[0]["stages"]["evaluate"]["key"] / "report.md"
    assert "## Published numbers" in report.read_text() and "names none" in report.read_text()

    # a rerun computes nothing: every stage of every run is a cache hit
    assert main(["sweep", "--config", str(path)]) == 0
    rerun = [r for r in read_records(artifacts) if r["sweep"] == "demo-2x2"][4:]
    assert len(rerun) == 4
    assert {e["status"] for r in rerun for e in r["stages"].values()} == {CACHE_HIT}

    # a failed run does not stop the others: evaluating a language the split lacks fails that variant
    # alone (the demo's own w_d is 0.3: its train is the one trained above, a cache hit)
    assert main(["sweep", "--config", str(path), "--name", "langs", "--grid", "evaluate.languages=[[de],[xx]]"]) == 2
    assert '1 of 2 runs of sweep langs failed: languages=["xx"]' in capsys.readouterr().err
    langs = {r["variant"]: r for r in read_records(artifacts) if r["sweep"] == "langs"}
    assert langs['languages=["de"]']["outcome"] == "completed"
    failed = langs['languages=["xx"]']
    assert failed["outcome"] == "failed" and "'xx'" in failed["error"]
    assert failed["stages"]["train[leccr]"]["status"] == CACHE_HIT and "evaluate" not in failed["stages"]
    assert (
        connect(artifacts)
        .execute("SELECT count(*) FROM run_metrics WHERE sweep = 'langs' AND lang = 'de' AND metric = 'sumr'")
        .fetchone()[0]
        > 0
    )


def test_both_deployments_are_flow_leccr_and_take_their_parameters():
    """prefect.yaml: `leccr/full` and `leccr/sweep` load, and their default parameters fit the flows."""
    from prefect.flows import load_flow_from_entrypoint

    repo = Path(__file__).parents[1]
    deployments = yaml.safe_load((repo / "prefect.yaml").read_text())["deployments"]
    assert {d["name"] for d in deployments} == {"full", "sweep"}
    for deployment in deployments:
        path, function = deployment["entrypoint"].split(":")
        flow = load_flow_from_entrypoint(f"{repo / path}:{function}")
        assert flow.name == "leccr"  # so `prefect deployment run leccr/<name>`
        flow.validate_parameters(deployment["parameters"])
