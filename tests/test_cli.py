"""The `leccr` command: a run through the embedded Prefect flow, cache hits, inspect, clear errors."""
import yaml

from leccr.cli import main


def test_run_then_rerun_is_all_cache_hits_and_inspect_shows_translate(demo_config, prefect_api, capsys):
    config, artifacts = demo_config
    assert main(["run", "--config", str(config), "--stage", "translate"]) == 0
    first = capsys.readouterr().out
    assert "translate" in first and str(artifacts) in first
    assert main(["run", "--config", str(config), "--stage", "translate"]) == 0
    record = yaml.safe_load((artifacts / "runs" / "demo.json").read_text())
    manifest = yaml.safe_load((artifacts / "translate" / record["translate"] / "_manifest.json").read_text())
    n = manifest["summary"]["translations"]
    capsys.readouterr()
    assert main(["inspect", "--root", str(artifacts), "SELECT count(*) AS n FROM translate"]) == 0
    assert str(n) in capsys.readouterr().out
    assert main(["inspect", "--root", str(artifacts), "--experiment", "demo", "--print-sql"]) == 0
    assert "CREATE OR REPLACE VIEW \"translate\" AS" in capsys.readouterr().out


def test_bad_config_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ndataset: {format: multi30k, path: /nope}\ntranslate: {shard_sise: 3}\n")
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "translate.shard_sise: unknown key" in err and "Traceback" not in err
