"""The demo's first run as a new user meets it, read off the console: each stage computed once, a miss
said in one line, no `None`, and closing hints whose commands work."""

import logging
import re
import shlex

import yaml

from leccr.cli import main
from tests.conftest import demo_config_dict

COMPUTED = re.compile(r"^\d\d:\d\d:\d\d (\S+)\s+computed in [\d.]+s .* (\S+)$")


def _small_demo_configs(demo_root, folder):
    """configs/demo.yaml and configs/demo_scene.yaml as `leccr demo` reads them (relative to the working
    folder), on the session's demo data and models: 6 items per split, two methods, one epoch."""
    (folder / "configs").mkdir()
    for name in ("demo", "demo_scene"):
        data = demo_config_dict(demo_root, folder / "artifacts", name)
        data["dataset"]["max_items_per_split"] = 6
        data["train"].update(methods=["baseline", "leccr"], epochs=1, early_stopping_patience=None)
        (folder / "configs" / f"{name}.yaml").write_text(yaml.safe_dump(data))
    return folder / "artifacts"


def test_the_demos_first_run_reads_cleanly(demo_root, tmp_path, monkeypatch, capsys):
    artifacts = _small_demo_configs(demo_root, tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--root", str(demo_root)]) == 0
    out, err = capsys.readouterr()
    console = out + err

    # Each stage computed once, into the store: the dataset once (no preview into a scratch folder), describe
    # once per engine (the tiny LLaVA, then the imported scene descriptions), every other stage once.
    computed = [m.groups() for line in err.splitlines() if (m := COMPUTED.match(line))]
    labels = [label for label, _ in computed]
    assert sorted(labels) == sorted(
        [
            "dataset",
            "describe",
            "describe",
            "translate",
            "visual",
            "features",
            "train[baseline]",
            "train[leccr]",
            "evaluate",
            "index",
        ]
    ), err
    assert all(path.startswith(str(artifacts)) for _, path in computed), computed
    assert "leccr-plan-" not in console
    # No library progress bar cuts into the stages' lines (transformers is imported before main() here, as
    # in a notebook: the environment variables that silence it at import came too late).
    assert "Loading weights" not in console

    # The engine switch is one short line that names it; the fields of one engine only are counted, not listed.
    switch = next(line for line in err.splitlines() if "describe: computing" in line and "engine" in line)
    assert "describe.engine: transformers → import (+" in switch and len(switch) < 200, switch
    assert "describe.max_tokens" not in switch and "image_views" not in switch

    assert not re.search(r"\bNone", console), [line for line in console.splitlines() if "None" in line]

    # Every closing hint is a command that works as printed: an inspect view that exists, a search.
    hints = [
        line.split(": ", 1)[1] if line.startswith(("Inspect", "Compare")) else line.strip()
        for line in out.splitlines()
        if re.match(r"^(Inspect them with|Compare methods): leccr |^  leccr search ", line)
    ]
    assert len(hints) == 3, out  # after the LLaVA's describe-only run, after the whole run, the search
    assert "FROM descriptions" in hints[0]  # the describe-only run made no translate table
    for hint in hints:
        capsys.readouterr()
        assert main(shlex.split(hint)[1:]) == 0, hint
        answer = capsys.readouterr()
        assert answer.out.strip() and not answer.err, (hint, answer)

    # --dry-run -v lists every field an engine switch changes; without -v the line stays short.
    switch_back = [
        "run",
        "--config",
        "configs/demo_scene.yaml",
        "--stage",
        "describe",
        "--dry-run",
        "--set",
        "describe.engine=transformers",
        "--set",
        f"describe.model={demo_root}/models/llava",
    ]
    assert main(switch_back) == 0
    plan = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("describe"))
    assert "describe.engine: import → transformers (+" in plan and "describe.max_tokens" not in plan, plan
    leccr_level = logging.getLogger("leccr").level
    try:
        assert main(["-v", *switch_back]) == 0
    finally:
        main(["inspect", "--root", str(artifacts), "SELECT 1"])  # the quiet console again
        logging.getLogger("leccr").setLevel(leccr_level)
    plan = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("describe"))
    assert "describe.engine: import → transformers;" in plan and "describe.max_tokens: (unset) → 256" in plan, plan
