"""Shared fixtures: the demo data and tiny models are built once per test session."""

import os
from pathlib import Path

import pytest

# vLLM must keep its engine in-process in tests (set before vllm is imported anywhere).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
# In-process flows start a temporary Prefect server; give it time on a loaded 2-core CI machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def pytest_collection_modifyitems(items):
    """Modules with slow tests first, the slowest first (`@pytest.mark.slow(seconds=N)`: N is a rough
    wall time on a 2-core machine). scripts/test.sh runs the suite on one pytest-xdist worker per core,
    each taking whole files (`--dist loadfile`) in this order: a minute-long module collected last would
    leave one core idle while the other finishes it."""
    module_cost: dict[str, float] = {}
    for item in items:
        for mark in item.iter_markers("slow"):
            module_cost[item.module.__name__] = module_cost.get(item.module.__name__, 0) + mark.kwargs.get(
                "seconds", 30
            )
    items.sort(key=lambda item: -module_cost.get(item.module.__name__, 0))  # stable: file order otherwise


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """Demo dataset + tiny models, generated once per session by the same code `leccr demo` uses."""
    from leccr.cli.demo import prepare_demo

    root = tmp_path_factory.mktemp("demo")
    prepare_demo(root)
    return root


def demo_config_dict(demo_root: Path, artifacts: Path, name: str = "demo") -> dict:
    """configs/<name>.yaml (a demo experiment) with its paths pointed at a test session's demo folder and
    artifact root."""
    import yaml

    data = yaml.safe_load((Path(__file__).parents[1] / "configs" / f"{name}.yaml").read_text())
    text = yaml.safe_dump(data).replace("artifacts/demo/", f"{demo_root.as_posix()}/")
    data = yaml.safe_load(text)
    data["artifacts_root"] = str(artifacts)
    return data


@pytest.fixture
def demo_config(demo_root, tmp_path):
    """(path of a demo config file in tmp, its artifact root)."""
    import yaml

    artifacts = tmp_path / "artifacts"
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(demo_config_dict(demo_root, artifacts)))
    return path, artifacts


@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect server for every in-process flow run of the test session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    """A tiny LLaVA folder (random weights), built once per session (test_describe, test_vllm_engine)."""
    from leccr.tiny_models.mllm import build_tiny_llava
    from tests.test_describe import CORPUS

    return build_tiny_llava(tmp_path_factory.getbasetemp() / "tiny_llava", CORPUS, seed=0)
