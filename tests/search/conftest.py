"""A small trained demo with an index, built once per test session for the search tests."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import demo_config_dict

ITEMS_PER_SPLIT = 6  # the first 6 items of each split (images only: ids img* sort before vid*)
ALPHA = 0.6  # a real fused score (the demo's image models default to alpha 1: global only)


def search_config(demo_root: Path, artifacts: Path, **index) -> dict:
    """The demo config, small: 6 items per split, baseline + leccr for 2 epochs, the test split indexed."""
    data = demo_config_dict(demo_root, artifacts)
    data["dataset"]["max_items_per_split"] = ITEMS_PER_SPLIT
    data["train"].update({"methods": ["baseline", "leccr"], "epochs": 2, "batch_size": 16,
                          "early_stopping_patience": None})
    data["index"] = {"splits": ["test"], "alpha": ALPHA, "calibration_split": "test", "device": "cpu", **index}
    return data


@pytest.fixture(scope="session")
def indexed(demo_root, tmp_path_factory):
    """(config, {stage: outcome}) of the small demo run through the index stage."""
    from leccr.config import parse_config
    from leccr.core.driver import run_pipeline

    artifacts = tmp_path_factory.mktemp("search") / "artifacts"
    cfg = parse_config(search_config(demo_root, artifacts))
    return cfg, run_pipeline(cfg, ["index"])


def skip_loudly(request, reason: str) -> None:
    """Skip the test and print why on the terminal (pytest -q alone does not show skip reasons)."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\nSKIPPED {request.node.nodeid}: {reason}", flush=True)
    pytest.skip(reason)


@pytest.fixture
def faiss_or_skip(request):
    from leccr.engines.vectors import faiss_missing

    if reason := faiss_missing():
        skip_loudly(request, reason)


def method_dirs(outcomes) -> dict:
    """{method: its trained model folder} from a run's outcomes (one train artifact per method)."""
    return {label[len("train["):-1]: o.artifact.path / label[len("train["):-1]
            for label, o in outcomes.items() if label.startswith("train[")}


def upstream_inputs(outcomes, stages=("dataset", "describe", "features", "train")) -> dict:
    """The inputs of a downstream stage from a run's outcomes (train: every method's artifact)."""
    from leccr.core.artifact import MethodArtifacts

    inputs = {s: outcomes[s].artifact for s in stages if s != "train"}
    if "train" in stages:
        inputs["train"] = MethodArtifacts("train", {m: outcomes[f"train[{m}]"].artifact
                                                    for m in method_dirs(outcomes)})
    return inputs
