"""The design card's top level (stages/, schemas/, flows/ at the repository root) installs under the
leccr namespace: a wheel holds leccr/stages/... and nothing with a generic top-level name, with its data
files; the Prefect deployments' entrypoints name files that exist and flows that carry their names."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

REPO = Path(__file__).parents[1]
CARD = ("stages", "schemas", "flows")


def test_the_card_folders_stand_at_the_root_and_install_under_the_namespace(tmp_path):
    for folder in CARD:
        assert (REPO / folder / "__init__.py").is_file(), folder
        link = REPO / "leccr" / folder
        assert link.is_symlink() and link.resolve() == (REPO / folder).resolve(), folder
    # no build isolation: the installed setuptools builds it (nothing is downloaded)
    had_build = (REPO / "build").exists()
    try:
        subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path)], check=True, cwd=tmp_path)
    finally:
        if not had_build:  # setuptools' scratch folder, not ours to leave in the checkout
            shutil.rmtree(REPO / "build", ignore_errors=True)
    names = zipfile.ZipFile(next(tmp_path.glob("leccr-*.whl"))).namelist()
    top = {name.split("/", 1)[0] for name in names}
    assert {t for t in top if not t.startswith("leccr")} == set(), top  # nothing generic in site-packages
    for folder in CARD:
        expected = {f"leccr/{folder}/{p.name}" for p in (REPO / folder).glob("*.py")}
        assert expected <= set(names), folder
    for data in ("leccr/evaluation/published_results.yaml", "leccr/prompts/image.yaml",
                 "leccr/models/model_configs/leccr-image.json"):
        assert data in names, data


def test_deployment_entrypoints_name_existing_flows():
    import importlib.util

    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    assert {d["name"] for d in deployments} == {"full", "sweep"}
    for deployment in deployments:
        path, function = deployment["entrypoint"].split(":")
        assert (REPO / path).is_file(), path
        spec = importlib.util.spec_from_file_location(f"entry_{deployment['name']}", REPO / path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert getattr(module, function).name == "leccr"  # `prefect deployment run leccr/<name>`
