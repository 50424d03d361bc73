"""The index stage and search on a trained demo: files and key, query encoding from raw text, the ranking
against evaluate's exact fused ranking, candidates, `leccr search`, the DuckDB view."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from leccr.config import EvaluateConfig, parse_config
from leccr.search import DEFAULT_CANDIDATES, SearchEngine, UnknownLanguage, UnknownMethod
from leccr.core.context import StageContext
from leccr.schemas.core import read_table
from leccr.schemas.index import INDEX_ITEMS
from leccr.stages import evaluate
from tests.search.conftest import ALPHA, ITEMS_PER_SPLIT, method_dirs, upstream_inputs


def _engine(indexed) -> SearchEngine:
    cfg, outcomes = indexed
    return SearchEngine(outcomes["index"].artifact.path, method_dirs(outcomes), cfg.dataset.path, "cpu")


def _test_split(indexed):
    """evaluate's own view of the test split (items, captions per language with their token ids)."""
    cfg, outcomes = indexed
    ctx = StageContext(stage="evaluate", key="k", section=EvaluateConfig(split="test"),
                       inputs=upstream_inputs(outcomes),
                       out_dir=outcomes["index"].artifact.path, log=logging.getLogger("test"))
    return evaluate.load_split(ctx, ctx.section)


def test_index_files_and_schema(indexed):
    cfg, outcomes = indexed
    index = outcomes["index"].artifact.path
    items = read_table(index / "items.parquet", INDEX_ITEMS).to_pylist()
    assert len(items) == ITEMS_PER_SPLIT and {i["split"] for i in items} == {"test"}
    for item in items:  # media paths relative to the dataset root, and the file is there
        assert not Path(item["path"]).is_absolute() and (Path(cfg.dataset.path) / item["path"]).is_file()
        assert {c["lang"] for c in item["captions"]} >= {"en", "de"}
    leccr = pq.read_table(index / "leccr" / "embeddings.parquet")
    assert leccr.schema.field("embedding").type.list_size == 32
    assert leccr.schema.field("slots").type.list_size == 2 * 32  # demo leccr: 2 slots of the 32-d space
    assert leccr.column("item_id").to_pylist() == [i["item_id"] for i in items]
    vectors = np.stack(leccr.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert "slots" not in pq.read_table(index / "baseline" / "embeddings.parquet").column_names
    info = json.loads((index / "leccr" / "index.json").read_text())
    assert info["alpha"] == ALPHA and info["languages"] == ["en", "de", "fr", "zh"] and info["max_length"] == 48
    assert set(info["ranges"]) == {"en", "de", "fr", "zh", "*"}
    baseline = json.loads((index / "baseline" / "index.json").read_text())
    assert baseline["alpha"] == 1.0 and baseline["ranges"] is None  # no slots: the global cosine


def test_index_items_carry_each_items_dataset_captions_in_order(indexed):
    """items.parquet's captions are the dataset's captions of that item, every language, in the dataset
    table's order (built in Arrow: checked here against the rows read one by one)."""
    from leccr.schemas.dataset import CAPTIONS

    cfg, outcomes = indexed
    items = read_table(outcomes["index"].artifact.path / "items.parquet", INDEX_ITEMS).to_pylist()
    dataset = read_table(outcomes["dataset"].artifact.path / "captions.parquet", CAPTIONS).to_pylist()
    for item in items:
        assert item["captions"] == [{"lang": c["lang"], "kind": c["kind"], "text": c["text"]}
                                    for c in dataset if c["item_id"] == item["item_id"]]


def test_captions_by_item_keeps_order_and_leaves_no_item_out():
    import pyarrow as pa

    from leccr.stages.index import captions_by_item

    captions = pa.table({"item_id": ["a", "x", "b", "a", "b"], "lang": ["en", "en", "de", "de", "en"],
                         "kind": ["human"] * 5, "text": ["a1", "x1", "b1", "a2", "b2"]})
    lists = captions_by_item(captions, ["b", "c", "a"]).to_pylist()
    assert [[c["text"] for c in item] for item in lists] == [["b1", "b2"], [], ["a1", "a2"]]
    assert lists[2][1] == {"lang": "de", "kind": "human", "text": "a2"}


def test_key_holds_the_ann_setup_and_the_device_kind_only(indexed):
    from leccr.core.fingerprint import Fingerprinter
    from leccr.core.jobs import Job, parts_with_upstream

    cfg, _ = indexed

    def key_config(**index) -> dict:
        data = cfg.model_dump(mode="json")
        data["index"].update(index)
        return parts_with_upstream(parse_config(data), Job("index"), Fingerprinter(), {}).config

    base = key_config()
    assert key_config(device="cpu", batch_size=3, chunk_size=5) == base  # auto is the CPU on this machine
    assert key_config(device="cuda")["numerics"] == {"device_kind": "cuda"} != base["numerics"]
    hnsw = key_config(ann={"kind": "hnsw"})
    assert hnsw["ann"] == {"kind": "hnsw", "m": 32, "ef_construction": 200, "ef_search": 256}
    assert key_config(ann={"kind": "hnsw", "ef_search": 64}) != hnsw
    assert key_config(ann={"kind": "ivf"})["ann"] == {"kind": "ivf", "nlist": None, "nprobe": 64,
                                                      "train_size": 100_000, "seed": 0}
    assert key_config(alpha=0.9) != base and key_config(splits=["test", "val"]) != base


def test_queries_are_tokenised_as_the_features_stage_tokenised_captions(indexed):
    data = _test_split(indexed)
    encoder = _engine(indexed).method("leccr").encoder
    de = data.languages["de"]
    ids, mask = encoder.tokenize(de.texts)
    width = de.ids.shape[1]
    assert torch.equal(ids[:, :width], de.ids) and torch.equal(mask[:, :width], de.mask)
    with pytest.raises(UnknownLanguage, match="'cs'.*'en', 'de', 'fr', 'zh'"):
        encoder.encode_queries(["x"], "cs")


@pytest.mark.parametrize("lang", ["de", "en"])
def test_full_candidates_rank_exactly_as_evaluate(indexed, lang):
    """Every test caption as a raw-text query, candidates = the whole collection: the hits are evaluate's
    fused ranking of that caption's row (its block scores, whole-matrix min/max), in the same order."""
    cfg, outcomes = indexed
    data = _test_split(indexed)
    model = evaluate.load_model(method_dirs(outcomes)["leccr"])
    texts, visual_global, visual_slots = evaluate.encode_trained(model, data, 4, torch.device("cpu"))
    block = evaluate.make_score_block(texts[lang], visual_global, visual_slots, ALPHA, chunk_size=2)
    expected = block(slice(0, len(texts[lang])), slice(0, len(data.item_ids)))
    engine = _engine(indexed)
    n = len(data.item_ids)
    results = engine.search(data.languages[lang].texts, lang, "leccr", k=n, candidates=n)
    for query, hits in enumerate(results):
        order = torch.argsort(-expected[query], stable=True).tolist()
        assert [h.item_id for h in hits] == [data.item_ids[i] for i in order]
        np.testing.assert_allclose([h.score for h in hits], expected[query, order].numpy(), rtol=1e-5, atol=1e-6)


def test_fewer_candidates_rerank_the_global_top(indexed):
    """candidates=c: the c items of highest cosine, re-ordered by the fused score; no other item appears.
    k > c widens the pool to k."""
    from leccr.models.base import fuse_scores, similarity_parts

    engine = _engine(indexed)
    index = engine.method("leccr")
    query = index.encoder.encode_queries(["ein roter Kreis"], "de")
    top3 = torch.argsort(-(query @ index.vectors.t())[0], stable=True)[:3].sort().values
    ranges = {part: tuple(b) for part, b in index.info["ranges"]["de"].items()}
    fused = fuse_scores(*similarity_parts(query, index.vectors[top3], index.slots[top3]), ALPHA, ranges)[0]
    expected = top3[torch.argsort(-fused, stable=True)].tolist()
    item_ids = [item["item_id"] for item in engine.items]
    hits = engine.search(["ein roter Kreis"], "de", "leccr", k=2, candidates=3)[0]
    assert [item_ids.index(h.item_id) for h in hits] == expected[:2] and [h.rank for h in hits] == [1, 2]
    assert len(engine.search(["ein roter Kreis"], "de", "leccr", k=5, candidates=3)[0]) == 5


def test_unknown_method_and_language(indexed):
    engine = _engine(indexed)
    with pytest.raises(UnknownMethod, match="'cl2cm'.*'baseline', 'leccr'"):
        engine.search(["x"], "en", "cl2cm")
    with pytest.raises(UnknownLanguage, match="'ja'"):
        engine.search(["x"], "ja", "baseline")
    assert engine.loads == 0  # refused before any model loads


def test_cli_search_text_and_json(indexed, capsys):
    from leccr.cli import main

    cfg, outcomes = indexed
    root = str(cfg.artifacts_root)
    first_item = read_table(outcomes["index"].artifact.path / "items.parquet", INDEX_ITEMS).to_pylist()[0]
    query = next(c["text"] for c in first_item["captions"] if c["lang"] == "de")
    assert main(["search", query, "--lang", "de", "--method", "leccr", "-k", "3", "--root", root, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["hits"]) == 3 and out["lang"] == "de" and out["candidates"] == DEFAULT_CANDIDATES
    assert [h["rank"] for h in out["hits"]] == [1, 2, 3]
    assert out["hits"][0]["score"] >= out["hits"][1]["score"] >= out["hits"][2]["score"]
    assert {"item_id", "score", "path", "caption", "description"} <= set(out["hits"][0])
    # where each description comes from: the describe artifact's engine and model, and the demo's tiny
    # random-weight LLaVA marked as such
    hit = out["hits"][0]
    assert (hit["description_engine"], hit["description_model"], hit["description_random_weights"]) == (
        "transformers", Path(cfg.describe.model).name, True)
    assert hit["description_source"].startswith(f"transformers · {Path(cfg.describe.model).name}")
    assert "random-weight" in hit["description_source"]
    assert main(["search", query, "--lang", "de", "-k", "2", "--root", root]) == 0
    text = capsys.readouterr().out
    assert "2 hits for" in text and out["hits"][0]["item_id"] in text and "caption:" in text
    assert text.count("(from transformers · ") == 2 and "random-weight test model" in text
    assert main(["search", query, "--lang", "xx", "--root", root]) == 2
    assert "'xx'" in capsys.readouterr().err


def test_duckdb_index_view(indexed):
    from leccr.records.sql import connect

    cfg, _ = indexed
    con = connect(cfg.artifacts_root)
    rows = con.execute("SELECT method, count(*), max(len(embedding)) FROM index GROUP BY method ORDER BY method").fetchall()
    assert rows == [("baseline", ITEMS_PER_SPLIT, 32), ("leccr", ITEMS_PER_SPLIT, 32)]
    assert con.execute("SELECT count(*) FROM index_items").fetchone()[0] == ITEMS_PER_SPLIT


def test_demo_ends_with_ready_search_and_serve_commands(indexed, tmp_path, capsys):
    import shlex

    import yaml

    from leccr.cli import main
    from leccr.cli.demo import print_search_commands

    cfg, _ = indexed
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    print_search_commands(str(config))
    lines = capsys.readouterr().out.splitlines()
    search = next(line.strip() for line in lines if line.strip().startswith("leccr search"))
    assert "--lang de --method leccr" in search and f"--root {cfg.artifacts_root}" in search
    assert any(line.strip().startswith(f"leccr serve --root {cfg.artifacts_root}") for line in lines)
    assert main(shlex.split(search)[1:] + ["--json"]) == 0  # the printed command runs as printed
    assert len(json.loads(capsys.readouterr().out)["hits"]) == 5
