"""Item-level reuse (leccr.core.memo): after one caption edit and one replaced image, the per-item
stages compute only the touched items, and what they write is byte-identical (volatile columns aside)
to a full recompute of the changed data in a fresh store."""
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from leccr.config import parse_config
from leccr.core.memo import RowMemo, in_unit_order
from leccr.core.driver import run_pipeline
from leccr.core.explain import explain
from tests.builders import finish_handmade
from tests.conftest import demo_config_dict

STAGES = ["features"]  # with everything upstream: dataset, translate, describe, visual


def _config(demo_root: Path, data: Path, artifacts: Path):
    config = demo_config_dict(demo_root, artifacts)
    config["dataset"].update(path=str(data), max_items_per_split=6)
    config["describe"].update(max_tokens=8)
    return parse_config(config)


def _first_train_image(data: Path) -> tuple[int, str]:
    """(line, file name) of the train image with the smallest id: one the capped dataset keeps."""
    listing = (data / "data" / "task1" / "image_splits" / "train.txt").read_text(encoding="utf-8").split()
    name = min(n for n in listing if n.endswith(".png"))
    return listing.index(name), name


def _edit_one_caption(data: Path) -> None:
    line, _ = _first_train_image(data)
    captions = data / "data" / "task1" / "raw" / "train.en"
    lines = captions.read_text(encoding="utf-8").split("\n")
    lines[line] = lines[line].replace(" ", " small ", 1)  # one word more in one English caption
    captions.write_text("\n".join(lines), encoding="utf-8")


def _replace_one_image(data: Path) -> None:
    image = data / "images" / _first_train_image(data)[1]
    ImageOps.mirror(Image.open(image).convert("RGB")).save(image)


def _reuse(outcome) -> dict:
    return outcome.artifact.manifest.summary["reuse"]


@pytest.mark.slow
def test_a_caption_edit_and_a_replaced_image_compute_only_those_items(demo_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_root / "data", data)
    first = run_pipeline(_config(demo_root, data, tmp_path / "a"), STAGES)
    items = first["describe"].artifact.manifest.summary["items"]
    units = _reuse(first["describe"])["rows"]["computed"]  # one description per item and view

    _edit_one_caption(data)
    _replace_one_image(data)
    cfg = _config(demo_root, data, tmp_path / "a")
    planned = {p.name: p for p in explain(cfg, STAGES)}
    assert planned["describe"].status == "miss"
    views = len(cfg.describe.image_views)  # the replaced image's descriptions
    assert f"{views} of {units} descriptions to compute, {units - views} reused" in "; ".join(planned["describe"].reasons)
    assert f"1 of {items} items to compute" in "; ".join(planned["visual"].reasons)

    again = run_pipeline(cfg, STAGES)
    assert _reuse(again["describe"])["rows"] == {"computed": views, "reused": units - views}
    assert _reuse(again["visual"])["rows"] == {"computed": 1, "reused": items - 1}
    # the edited English caption, in each target language
    assert _reuse(again["translate"])["rows"]["computed"] == len(cfg.dataset.languages)
    text = _reuse(again["features"])["text"]
    assert text["computed"] == 1 and text["reused"] > 50  # that caption's row; its translations are unchanged
    assert _reuse(again["features"])["descriptions"]["computed"] <= 1  # the replaced image's description

    fresh = run_pipeline(cfg.model_copy(update={"artifacts_root": str(tmp_path / "b")}), STAGES)
    for stage, outcome in again.items():
        assert outcome.artifact.key == fresh[stage].artifact.key, stage
        assert outcome.artifact.manifest.file_digests == fresh[stage].artifact.manifest.file_digests, stage


def test_rows_are_kept_in_work_order_whatever_their_source():
    import pyarrow as pa

    table = pa.table({"item_id": ["b", "a", "b", "c"], "view": [1, 1, 2, 1]})
    ordered = in_unit_order(table, ["a", "b", "c"], ("item_id",))
    assert ordered.column("item_id").to_pylist() == ["a", "b", "b", "c"]
    assert ordered.column("view").to_pylist() == [1, 1, 2, 1]  # a unit's own rows keep their order


def test_a_failed_unit_is_never_reused(tmp_path):
    import pyarrow as pa

    from leccr.core.artifact import Artifact
    from leccr.core.memo import INPUTS, INPUTS_DIR, inputs_name
    from leccr.schemas.core import write_table
    from leccr.schemas.errors import ERRORS

    folder = tmp_path / "describe" / "0123456789abcdef"
    write_table(pa.table({"item_id": ["a"], "value": pa.array([1], pa.int64())}), folder / "part-00000.parquet",
                pa.schema([("item_id", pa.string()), ("value", pa.int64())]))
    write_table(pa.table({"unit": ["a", "b"], "input_digest": ["da", "db"], "error_key": ["a", "b"]}),
                folder / INPUTS_DIR / inputs_name(0), INPUTS)
    write_table(pa.Table.from_pylist([{"item_id": "b", "stage": "describe", "shard": 0, "reason": "unreadable",
                                       "file": None, "line": None, "retryable": False, "file_state": None}],
                                     schema=ERRORS), folder / "errors.parquet", ERRORS)
    finish_handmade("describe", folder, folder.name)
    memo = RowMemo([Artifact("describe", folder.name, folder)])
    assert memo.split(["a", "b"], ["da", "db"]) == {0: folder / "part-00000.parquet"}
    assert memo.split(["a"], ["changed"]) == {}
