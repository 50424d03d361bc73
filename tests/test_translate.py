"""translate stage: import engines, errors, quality figures, and the transformers engine on a tiny Marian."""

import json
import logging

import pytest

from leccr.config import TranslateConfig
from leccr.core.context import StageContext
from leccr.core.failures import StageFailed
from leccr.schemas.core import read_table
from leccr.schemas.errors import ERRORS
from leccr.schemas.translate import TRANSLATIONS
from leccr.stages import translate
from tests.builders import dataset_artifact

ITEMS = [{"item_id": "a", "split": "train"}, {"item_id": "b", "split": "train"}, {"item_id": "c", "split": "test"}]
CAPTIONS = [
    {"item_id": "a", "caption_id": "a#0", "split": "train", "lang": "en", "text": "a red circle"},
    {"item_id": "a", "caption_id": "a#1", "split": "train", "lang": "en", "text": "a red circle"},
    {"item_id": "b", "caption_id": "b#0", "split": "train", "lang": "en", "text": "a blue square on a green ground"},
    {"item_id": "a", "caption_id": "a#0", "split": "train", "lang": "de", "text": "ein roter Kreis", "kind": "mt"},
    {"item_id": "a", "caption_id": "a#1", "split": "train", "lang": "de", "text": "ein roter Kreis", "kind": "mt"},
    {
        "item_id": "b",
        "caption_id": "b#0",
        "split": "train",
        "lang": "de",
        "text": "ein blaues Quadrat auf grünem Grund",
        "kind": "mt",
    },
    # Human references aligned with English captions by id: quality is scored against them.
    {
        "item_id": "b",
        "caption_id": "b#0",
        "split": "train",
        "lang": "de",
        "text": "ein blaues Quadrat auf grünem Grund",
    },
    {"item_id": "c", "caption_id": "c#0", "split": "test", "lang": "en", "text": "a green star"},
]


def _ctx(tmp_path, section, captions=CAPTIONS, languages=("de",)):
    dataset = dataset_artifact(tmp_path / "dataset", ITEMS, captions, list(languages))
    out = tmp_path / "translate" / "k"
    out.mkdir(parents=True)
    return StageContext("translate", "k", section, {"dataset": dataset}, out, logging.getLogger("t"))


def _output(ctx):
    rows = read_table(sorted(ctx.out_dir.glob("part-*.parquet")), TRANSLATIONS).to_pylist()
    return sorted((r["caption_id"], r["lang"], r["text"], r["source_text"], r["engine"]) for r in rows)


def test_import_from_the_datasets_shipped_translations(tmp_path):
    ctx = _ctx(tmp_path, TranslateConfig(engine="import", splits=["train"], shard_size=2))
    translate.run(ctx)
    assert _output(ctx) == [
        ("a#0", "de", "ein roter Kreis", "a red circle", "import"),
        ("a#1", "de", "ein roter Kreis", "a red circle", "import"),
        ("b#0", "de", "ein blaues Quadrat auf grünem Grund", "a blue square on a green ground", "import"),
    ]
    assert len(list(ctx.out_dir.glob("part-*.parquet"))) == 2  # 3 captions in shards of 2
    # One reference (b#0) matches exactly: chrF and BLEU are 100 on it.
    assert ctx.summary["quality"] == {"de": {"n": 1, "chrF": 100.0, "BLEU": 100.0}}


def test_missing_translations_are_errors_and_fail_past_the_threshold(tmp_path):
    captions = [c for c in CAPTIONS if not (c["caption_id"] == "b#0" and c.get("kind") == "mt")]
    ctx = _ctx(tmp_path, TranslateConfig(engine="import", splits=["train"], max_error_rate=0.5), captions)
    translate.run(ctx)
    errors = read_table(ctx.out_dir / "errors.parquet", ERRORS).to_pylist()
    assert [(e["item_id"], e["reason"]) for e in errors] == [("b#0", "no de translation in dataset")]
    ctx = _ctx(tmp_path / "strict", TranslateConfig(engine="import", splits=["train"], max_error_rate=0.1), captions)
    with pytest.raises(StageFailed, match=r"1 of 3 caption translations failed"):
        translate.run(ctx)


def test_import_from_files_in_three_formats(tmp_path):
    (tmp_path / "mt.de.json").write_text(json.dumps({"a#0": "A", "a#1": "B", "b#0": "C"}))
    (tmp_path / "mt.fr.jsonl").write_text(
        "\n".join(json.dumps({"caption_id": c, "text": t}) for c, t in [("a#0", "D"), ("a#1", "E"), ("b#0", "F")])
    )
    (tmp_path / "mt.zh.tsv").write_text("a#0\tG\na#1\tH\nb#0\tI\n")
    ctx = _ctx(
        tmp_path,
        TranslateConfig(engine="import", splits=["train"], import_path=str(tmp_path / "mt.{lang}.json")),
        languages=["de"],
    )
    translate.run(ctx)
    assert [r[2] for r in _output(ctx)] == ["A", "B", "C"]
    with pytest.raises(ValueError, match=r"mt.zh.tsv:1: expected 'caption_id<TAB>text', got 3 field"):
        (tmp_path / "mt.zh.tsv").write_text("a#0\tG\textra\n")
        translate._load_translation_file(tmp_path / "mt.zh.tsv")
    assert translate._load_translation_file(tmp_path / "mt.fr.jsonl")["b#0"] == "F"
