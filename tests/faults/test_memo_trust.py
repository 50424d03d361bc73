"""The row memo and the store's bookkeeping on the paths real users take (issue 31, parts 2, 3, 4, 6).

A miss takes unchanged units' rows from earlier artifacts (leccr.core.memo). These tests damage those
sources, change their layout, change one view, language or split, change values rows record, and
damage the bookkeeping files; each checks that nothing stale is served, nothing crashes, what is
skipped is named, and a memo-built artifact equals a fresh build (its content digest, which every
downstream key is made from). Each fails on the code before issue 31.
"""
import json
import logging
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image, ImageOps

from leccr.cli import main
from leccr.config import load_config, parse_config
from leccr.core.driver import run_pipeline
from leccr.core.explain import explain
from leccr.schemas.core import write_table
from leccr.schemas.translate import TRANSLATIONS
from tests.faults.test_faults import ONE_VIEW, _config, _copy, _test_items


def _translate_only(demo_root: Path, data: Path, artifacts: Path, **translate) -> dict:
    return _config(demo_root, data, artifacts, translate={"splits": ["train"], "shard_size": 16, **translate})


def _edit_english_caption(data: Path, line: int) -> None:
    captions = data / "data/task1/raw/train.en"
    lines = captions.read_text(encoding="utf-8").split("\n")
    lines[line] = lines[line].replace(" ", " small ", 1)
    captions.write_text("\n".join(lines), encoding="utf-8")


def _fresh(cfg, root: Path, stages: list[str]):
    return run_pipeline(cfg.model_copy(update={"artifacts_root": str(root)}), stages)


def _warnings(caplog) -> str:
    return " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# ------------------------------------------------------------------------------ part 2: sources
def test_a_source_shard_that_disagrees_with_its_manifest_is_not_copied(demo_root, tmp_path, caplog):
    data = _copy(demo_root, tmp_path / "data")
    cfg = parse_config(_translate_only(demo_root, data, tmp_path / "a"))
    source = run_pipeline(cfg, ["translate"])["translate"].artifact
    # Someone rewrote a finished shard with other rows that still read as Parquet.
    part = source.path / "part-00001.parquet"
    table = pq.read_table(part)
    shouted = table.set_column(table.schema.get_field_index("text"), "text",
                               pa.array([t.upper() for t in table.column("text").to_pylist()]))
    write_table(shouted, part, TRANSLATIONS)

    _edit_english_caption(data, 0)  # a new key with the same memo salt: the damaged artifact is a source
    edited = parse_config(_translate_only(demo_root, data, tmp_path / "a"))
    with caplog.at_level(logging.WARNING, logger="leccr"):
        again = run_pipeline(edited, ["translate"])["translate"].artifact
    assert "part-00001.parquet" in _warnings(caplog) and source.key in _warnings(caplog)
    fresh = _fresh(edited, tmp_path / "b", ["translate"])["translate"].artifact
    assert again.manifest.content_digest == fresh.manifest.content_digest
    assert not any(t.isupper() for t in pq.read_table(again.path / "part-00001.parquet").column("text").to_pylist())


def test_a_source_without_a_readable_errors_file_gives_nothing(demo_root, tmp_path):
    data = _copy(demo_root, tmp_path / "data")
    mt = data / "TextData/Flickr30ktrain_google_enc2de.caption.txt"
    lines = mt.read_text(encoding="utf-8").split("\n")
    mt.write_text("\n".join(lines[1:]), encoding="utf-8")  # one caption has no shipped German: an error row
    cfg = parse_config(_translate_only(demo_root, data, tmp_path / "a", max_error_rate=0.5))
    source = run_pipeline(cfg, ["translate"])["translate"].artifact
    assert pq.read_table(source.path / "errors.parquet").num_rows == 1
    (source.path / "errors.parquet").unlink()  # which unit failed there is unknown now

    _edit_english_caption(data, 5)
    edited = parse_config(_translate_only(demo_root, data, tmp_path / "a", max_error_rate=0.5))
    again = run_pipeline(edited, ["translate"])["translate"]
    fresh = _fresh(edited, tmp_path / "b", ["translate"])["translate"]
    # the failed caption failed again, never reused as "no rows, no error"
    assert again.errors == fresh.errors and again.errors >= 1
    assert again.artifact.manifest.content_digest == fresh.artifact.manifest.content_digest
    assert again.artifact.manifest.summary["reuse"]["rows"]["reused"] == 0


def test_a_source_in_another_layout_is_skipped_and_named_never_a_crash(demo_root, tmp_path, caplog):
    data = _copy(demo_root, tmp_path / "data")
    quick = _config(demo_root, data, tmp_path / "a")
    quick["dataset"]["max_items_per_split"] = 3  # the first ids are images: fixed-size visual arrays
    run_pipeline(parse_config(quick), ["visual"])
    full = parse_config(_config(demo_root, data, tmp_path / "a"))  # videos too: the variable layout
    planned = {p.name: p for p in explain(full, ["visual"])}
    assert planned["visual"].status == "miss"
    with caplog.at_level(logging.WARNING, logger="leccr"):
        visual = run_pipeline(full, ["visual"])["visual"]
    assert "rows are stored as" in _warnings(caplog) and "fixed_size_list" in _warnings(caplog)
    assert visual.output_rows == 84 and visual.artifact.manifest.summary["fixed"] is False


# ------------------------------------------------------------------------------ part 3: grain
def test_a_view_a_language_and_a_split_compute_only_their_units(demo_root, tmp_path):
    data = _copy(demo_root, tmp_path / "data")
    config = _config(demo_root, data, tmp_path / "a", dataset={"languages": ["de"], "max_items_per_split": 6},
                     describe={"splits": ["test"], "image_views": ONE_VIEW, "video_views": ONE_VIEW, "max_tokens": 4},
                     translate={"splits": ["train"]})
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    stages = ["translate", "describe"]
    first = run_pipeline(load_config(path), stages)
    items, val, captions = 6, 6, first["translate"].output_rows

    def reuse(cfg, stage):
        return run_pipeline(cfg, stages)[stage].artifact.manifest.summary["reuse"]["rows"]

    # one view more, from the command line: the file's own view stays, only the new one is described
    colours = load_config(path, {"describe.image_views.colours": "Which colours?",
                                 "describe.video_views.colours": "Which colours?"})
    assert list(colours.describe.image_views) == ["detailed", "colours"]
    assert reuse(colours, "describe") == {"computed": items, "reused": items}
    # a split more: its items alone, in both views
    more = load_config(path, {"describe.image_views.colours": "Which colours?",
                              "describe.video_views.colours": "Which colours?", "describe.splits": ["test", "val"]})
    assert reuse(more, "describe") == {"computed": 2 * val, "reused": 2 * items}
    # a language more: that language alone
    assert reuse(load_config(path, {"dataset.languages": ["de", "fr"]}), "translate") == \
        {"computed": captions, "reused": captions}


# ------------------------------------------------------------------------------ part 4: rows and keys
def test_a_memo_built_artifact_equals_a_fresh_one_and_rows_name_what_the_key_counts(demo_root, tmp_path):
    data = _copy(demo_root, tmp_path / "data")
    llava = Path(shutil.copytree(demo_root / "models" / "llava", tmp_path / "llava-a"))

    def describe(seed, model=llava, root="a"):
        return parse_config(_config(demo_root, data, tmp_path / root, dataset={"max_items_per_split": 6},
                                    describe={"splits": ["test"], "image_views": ONE_VIEW, "video_views": ONE_VIEW,
                                              "max_tokens": 4, "seed": seed, "top_p": 0.5, "model": str(model)}))

    run_pipeline(describe(seed=1), ["describe"])
    image = data / "images" / min(n for n in _test_items(data) if n.endswith(".png"))  # one the cap keeps
    ImageOps.mirror(Image.open(image).convert("RGB")).save(image)
    # Greedy decoding: seed and top_p draw nothing, are in no key, and no row records them.
    memo_built = run_pipeline(describe(seed=2), ["describe"])["describe"].artifact
    assert memo_built.manifest.summary["reuse"]["rows"]["computed"] == 1
    fresh = run_pipeline(describe(seed=2, root="b"), ["describe"])["describe"].artifact
    assert memo_built.manifest.content_digest == fresh.manifest.content_digest

    # A renamed model folder: the rows name the model, so its name is in the key.
    renamed = llava.rename(tmp_path / "llava-b")
    planned = {p.name: p for p in explain(describe(seed=2, model=renamed), ["describe"])}
    assert planned["describe"].status == "miss" and "renamed" in "; ".join(planned["describe"].reasons)
    rows = pq.read_table(run_pipeline(describe(seed=2, model=renamed), ["describe"])["describe"].artifact.parts())
    assert set(rows.column("model").to_pylist()) == {"llava-b"}
    assert set(rows.column("seed").to_pylist()) == {None}


# ------------------------------------------------------------------------------ part 6: bookkeeping
def test_damaged_bookkeeping_is_a_miss_that_names_itself(demo_root, tmp_path, caplog, capsys):
    data = _copy(demo_root, tmp_path / "data")
    config = _translate_only(demo_root, data, tmp_path / "a")
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    cfg = load_config(path)
    first = run_pipeline(cfg, ["translate"])
    translate, dataset = first["translate"].artifact, first["dataset"].artifact

    (translate.path / "_manifest.json").write_bytes(b"")
    assert main(["run", "--config", str(path), "--stage", "translate", "--dry-run"]) == 0
    assert "_manifest.json is empty (0 bytes)" in capsys.readouterr().out
    with caplog.at_level(logging.WARNING, logger="leccr"):
        again = run_pipeline(cfg, ["translate"])["translate"]
    assert "_manifest.json is empty (0 bytes)" in _warnings(caplog) and not again.cache_hit

    # A cut row-memo record: named, and its whole shard computed again (with its record).
    inputs = translate.path / "_inputs" / "inputs-00001.parquet"
    inputs.write_bytes(inputs.read_bytes()[:40])
    assert main(["run", "--config", str(path), "--stage", "translate", "--dry-run"]) == 0
    assert "_inputs/inputs-00001.parquet is 40 bytes" in capsys.readouterr().out
    healed = run_pipeline(cfg, ["translate"])["translate"].artifact
    fresh = _fresh(cfg, tmp_path / "b", ["translate"])["translate"].artifact
    assert healed.manifest.content_digest == fresh.manifest.content_digest
    assert healed.manifest.summary["reuse"]["rows"]["computed"] > 0

    # gc lists a garbled manifest and skips it, never a crash.
    (dataset.path / "_manifest.json").write_text('{"stage": "dataset", "key": ')
    assert main(["gc", "--root", str(tmp_path / "a"), "--yes"]) == 0
    out = capsys.readouterr().out
    assert f"dataset/{dataset.key}" in out and "_manifest.json is not JSON" in out
    assert dataset.path.is_dir()
    assert json.loads((translate.path / "_manifest.json").read_text())["key"] == translate.key


def test_a_held_source_is_kept_by_gc_and_a_discard_waits_for_it(tmp_path):
    import threading

    from leccr.core.artifact import Store, held
    from leccr.records.gc import collect
    from tests.builders import finish_handmade

    folder = tmp_path / "translate" / "0123456789abcdef"
    folder.mkdir(parents=True)
    from leccr.schemas.errors import ERRORS

    write_table(ERRORS.empty_table(), folder / "errors.parquet", ERRORS)
    source = finish_handmade("translate", folder, folder.name)
    store = Store(tmp_path)
    with held(source.path) as present:
        assert present
        assert [g.note for g in collect(tmp_path)] == ["in use by a running stage: kept"]
        discard = threading.Thread(target=store.discard, args=(source,))
        discard.start()
        discard.join(0.5)
        assert discard.is_alive() and source.path.is_dir()  # --force elsewhere waits for the reader
    discard.join(10)
    assert not source.path.exists()
    with held(source.path) as present:  # gone before it could be held: nothing to read
        assert not present
