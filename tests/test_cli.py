"""The `leccr` command: a run (in this process), cache hits, inspect, clear errors."""
import logging
from importlib.metadata import version

import pytest
import yaml

from leccr.cli import main
from leccr.cli.console import configure_logging


def test_run_then_rerun_is_all_cache_hits_and_inspect_shows_translate(demo_config, capsys):
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


def test_help_lists_stages_and_formats_and_every_command_has_help(capsys):
    from leccr.cli import build_parser, stage_names
    from leccr.datasets import list_formats
    from leccr.core import dag

    assert stage_names() == list(dag.stage_names())  # the cheap source scan: the same stages, same order
    for argv in (["run", "--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "Stages: " + ", ".join(stage_names()) in text
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    demo_help = " ".join(capsys.readouterr().out.split())
    assert "--root ROOT folder for the generated demo data" in demo_help and "--config CONFIG experiment YAML" in demo_help
    with pytest.raises(SystemExit):
        main(["datasets", "check", "--help"])
    check_help = " ".join(capsys.readouterr().out.split())
    assert "the dataset's layout: " + ", ".join(list_formats()) in check_help
    assert "path the dataset's root folder" in check_help and "--option KEY=VALUE an adapter option" in check_help
    with pytest.raises(SystemExit) as done:
        main(["build-tiny-models", "--help"])
    assert done.value.code == 0 and "--corpus-file" in capsys.readouterr().out
    top = build_parser().format_help()
    assert "tests call" not in top and "argv" not in top
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"leccr {version('leccr')}"


def test_set_typo_is_the_overrides_fault_with_a_suggestion(demo_config, capsys):
    config, _ = demo_config
    assert main(["run", "--config", str(config), "--set", "translate.num_beam=4"]) == 2
    err = capsys.readouterr().err
    assert "--set translate.num_beam: unknown key (did you mean translate.num_beams?)" in err
    assert f"{config}: invalid config" not in err and err.startswith("leccr: error: --set: invalid config")


def test_console_shows_leccr_lines_not_library_chatter(capsys):
    from leccr.cli.console import configure_logging
    from leccr.runtime.progress import progress

    configure_logging(verbose=False)
    logging.getLogger("httpx").info("HTTP Request: POST http://127.0.0.1/api/logs/ 201")
    logging.getLogger("prefect.server.services").error("Failed to send telemetry")
    logging.getLogger("transformers.modeling_utils").warning("Some weights were not initialized")
    with progress(4, "describe", "items") as bar:  # leccr's own code, non-TTY: a log line at the end
        bar.update(4)
    err = capsys.readouterr().err
    assert "describe: 4/4 items" in err and "items/s, ETA" in err
    assert "HTTP Request" not in err and "telemetry" not in err and "Some weights" not in err
    configure_logging(verbose=True)
    logging.getLogger("httpx").info("HTTP Request: POST http://127.0.0.1/api/logs/ 201")
    assert "INFO httpx: HTTP Request" in capsys.readouterr().err
    configure_logging(verbose=False)


def test_an_error_is_one_line_and_a_hint_traceback_only_with_v(tmp_path, capsys):
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes("Grüße\n".encode("latin-1"))  # not UTF-8: an error no handler expects
    argv = ["build-tiny-models", "--out", str(tmp_path / "m"), "--corpus-file", str(corpus)]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("leccr: error: ") and "utf-8" in lines[0]
    assert lines[1] == "leccr: hint: add -v for the traceback"
    assert main(["-v", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "UnicodeDecodeError" in err and "hint" not in err
    # -v let every library log through: back to the quiet console before reading the next error alone
    # (a Prefect log shipper of an earlier test logs through httpx from its own thread)
    configure_logging(False)
    capsys.readouterr()
    # a missing file: the message names it, no hint needed
    assert main(["build-tiny-models", "--out", str(tmp_path / "m"), "--corpus-file", str(tmp_path / "no.txt")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"leccr: error: [Errno 2] No such file or directory: '{tmp_path / 'no.txt'}'"]


def test_search_takes_root_experiment_and_media_folder_from_an_experiment_file(tmp_path):
    """After the dataset folder moved, `--config` points search and serve at where it lies now."""
    from pathlib import Path

    from leccr.cli import build_parser
    from leccr.cli.search import _index_source

    data = yaml.safe_load((Path(__file__).parents[1] / "configs" / "demo.yaml").read_text())
    data.update(artifacts_root=str(tmp_path / "artifacts"), name="moved")
    data["dataset"]["path"] = str(tmp_path / "new-place")
    config = tmp_path / "moved.yaml"
    config.write_text(yaml.safe_dump(data))
    args = build_parser().parse_args(["search", "ein Hund", "--config", str(config)])
    assert _index_source(args) == (str(tmp_path / "artifacts"), "moved", str(tmp_path / "new-place"))
    args = build_parser().parse_args(["serve", "--root", "r", "--data-root", "d"])
    assert _index_source(args) == ("r", None, "d")


def test_usage_errors_are_leccr_error_lines_with_exit_2_and_fitting_hints(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["run"])  # argparse's own error, in the same form
    err = capsys.readouterr().err
    assert done.value.code == 2 and "leccr: error: run: the following arguments are required: --config" in err
    assert "leccr: hint: `leccr run --help` lists the options" in err
    assert main(["run", "--config", str(tmp_path / "none.yaml"), "--set", "train.seed=1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == f"leccr: error: config file not found: {tmp_path / 'none.yaml'}"
    assert lines[1].startswith("leccr: hint: the experiment files shipped with leccr: configs/demo.yaml")
    assert "config keys" not in lines[1] and "leccr/config.py" not in lines[1]
    assert main(["run", "--config", "configs/demo.yaml", "--set", "train.seed"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "leccr: error: --set expects KEY=VALUE, got 'train.seed' (e.g. --set train.seed=1)"]


@pytest.mark.parametrize("argv, message", [
    (["", "--lang", "de"], "the query is empty"),
    (["   ", "--lang", "de"], "the query is empty"),
    (["ein Hund", "-k", "-1"], "k must be between 1 and 100, got -1"),
    (["ein Hund", "-k", "0"], "k must be between 1 and 100, got 0"),
    (["ein Hund", "-k", "101"], "k must be between 1 and 100, got 101"),
    (["ein Hund", "--candidates", "0"], "candidates must be between 1 and 10000, got 0"),
    (["ein Hund", "--candidates", "-5"], "candidates must be between 1 and 10000, got -5"),
    (["x" * 501], "the query is 501 characters long; the limit is 500"),
])
def test_search_refuses_what_the_api_refuses_with_its_message_and_exit_2(tmp_path, capsys, argv, message):
    """Checked before any index or model is opened: no artifacts are needed to be refused."""
    assert main(["search", *argv, "--root", str(tmp_path / "no-artifacts")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"leccr: error: {message}"]


def test_dry_run_names_set_fields_the_engine_does_not_use(demo_config, capsys):
    config, _ = demo_config
    data = yaml.safe_load(config.read_text())
    assert data["translate"]["engine"] == "import"
    argv = ["run", "--config", str(config), "--dry-run", "--set", "translate.num_beams=4",
            "--set", "describe.decode_workers=1", "--set", "train.seed=3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "note: --set translate.num_beams: not used by engine import; it changes no key" in out
    assert "note: --set describe.decode_workers: changes speed or where work runs, not output" in out
    assert "train.seed" not in out.split("to run")[-1]  # a field that is used gets no note
