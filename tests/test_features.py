"""The features stage on a tiny hand-built dataset with real tiny models (leccr.tiny_models), run
through leccr.core.execute.run_stage: values, joins of translations, description views and states, the
shared visual cache, resume after a failed shard, imported features."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import leccr.features.vision as vision_module
from leccr.config import ExperimentConfig, FeaturesConfig, VisualConfig
from leccr.core.artifact import Artifact
from leccr.core.execute import run_stage
from leccr.core.failures import StageFailed
from leccr.core.fingerprint import Fingerprinter
from leccr.core.keys import resolve_section
from leccr.data import TrainingDataset, load_eval_items
from leccr.features.vision import VisionEncoder
from leccr.schemas.core import write_table
from leccr.schemas.dataset import CAPTIONS, ITEMS
from leccr.schemas.describe import DESCRIPTIONS
from leccr.schemas.translate import TRANSLATIONS
from tests.builders import finish_handmade

COLOURS = {"a": (255, 0, 0), "b": (0, 255, 0), "c": (0, 0, 255), "d": (255, 255, 0), "t1": (0, 255, 255)}
CORPUS = [
    "a red square",
    "a green square",
    "a blue square",
    "a yellow square",
    "a cyan square",
    "ein rotes Quadrat",
    "ein grünes Quadrat",
    "ein blaues Quadrat",
    "ein cyan Quadrat",
    "the shape is red",
    "the shape is green",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from leccr.tiny_models.text import build_text_encoder
    from leccr.tiny_models.vision import build_vision

    root = tmp_path_factory.mktemp("models")
    return {"vision": build_vision(root / "vision", seed=0), "text": build_text_encoder(root / "text", CORPUS, seed=0)}


@pytest.fixture
def inputs(tmp_path):
    """Items a-d (train), t1 (test), bad (an empty file: a media error); translations for a-c
    (b's replaces the shipped one); descriptions: a two views, b one, c-d none, t1 one."""
    media = tmp_path / "media"
    media.mkdir()
    rows = []
    for item, colour in COLOURS.items():
        Image.new("RGB", (40, 36), colour).save(media / f"{item}.png")
        rows.append(
            {
                "item_id": item,
                "split": "test" if item == "t1" else "train",
                "media_type": "image",
                "path": str(media / f"{item}.png"),
                "feature_path": None,
            }
        )
    (media / "bad.png").write_bytes(b"")
    rows.append(
        {
            "item_id": "bad",
            "split": "train",
            "media_type": "image",
            "path": str(media / "bad.png"),
            "feature_path": None,
        }
    )
    dataset_dir = tmp_path / "dataset"
    write_table(pa.Table.from_pylist(rows, ITEMS), dataset_dir / "items.parquet", ITEMS)
    names = {"a": "red", "b": "green", "c": "blue", "d": "yellow", "t1": "cyan", "bad": "red"}
    captions = [
        {
            "item_id": i,
            "caption_id": f"{i}0",
            "split": r["split"],
            "lang": "en",
            "text": f"a {names[i]} square",
            "kind": "human",
        }
        for i, r in zip(names, rows)
    ]
    captions += [
        {"item_id": "b", "caption_id": "b0", "split": "train", "lang": "de", "text": "ein Quadrat", "kind": "mt"},
        {
            "item_id": "t1",
            "caption_id": "t1de",
            "split": "test",
            "lang": "de",
            "text": "ein cyan Quadrat",
            "kind": "human",
        },
    ]
    write_table(pa.Table.from_pylist(captions, CAPTIONS), dataset_dir / "captions.parquet", CAPTIONS)
    translations = [
        {
            "item_id": i,
            "caption_id": f"{i}0",
            "lang": "de",
            "text": text,
            "source_text": f"a {names[i]} square",
            "engine": "import",
            "model": None,
        }
        for i, text in [("a", "ein rotes Quadrat"), ("b", "ein grünes Quadrat"), ("c", "ein blaues Quadrat")]
    ]
    translate_dir = tmp_path / "translate"
    write_table(pa.Table.from_pylist(translations, TRANSLATIONS), translate_dir / "part-00000.parquet", TRANSLATIONS)
    descriptions = [
        {
            "item_id": i,
            "view_id": v,
            "prompt": "",
            "description": text,
            "n_tokens": None,
            "engine": "import",
            "model": None,
            "sampling": "{}",
            "seed": None,
            "seconds": 0.0,
        }
        for i, v, text in [
            ("a", "scene", "the shape is red"),
            ("a", "objects", "a red square"),
            ("b", "scene", "the shape is green"),
            ("c", "scene", "   "),
            ("t1", "scene", "a cyan square"),
        ]
    ]
    describe_dir = tmp_path / "describe"
    write_table(pa.Table.from_pylist(descriptions, DESCRIPTIONS), describe_dir / "part-00000.parquet", DESCRIPTIONS)
    return {
        "dataset": finish_handmade("dataset", dataset_dir, "dskey", config={"languages": ["de"]}),
        "translate": finish_handmade("translate", translate_dir, "trkey"),
        "describe": finish_handmade("describe", describe_dir, "dekey"),
        "media": media,
    }


def experiment(tmp_path, models, **features) -> ExperimentConfig:
    settings = {
        "vision_model": str(models["vision"]),
        "text_model": str(models["text"]),
        "shard_size": 2,
        "max_error_rate": 0.5,
        "device": "cpu",
        "batch_size": 3,
        **features,
    }
    return ExperimentConfig(
        name="t",
        artifacts_root=str(tmp_path / "artifacts"),
        dataset={"format": "multi30k", "path": str(tmp_path)},
        features=settings,
    )


def run_visual(cfg, inputs, **kwargs):
    return run_stage(cfg, "visual", {"dataset": inputs["dataset"]}, **kwargs)


def run(cfg, inputs, **kwargs):
    """The visual stage, then features on its artifact (as the pipeline runs them)."""
    visual = run_visual(cfg, inputs, **kwargs)
    inputs = {k: v for k, v in inputs.items() if k != "media"}
    return run_stage(cfg, "features", {**inputs, "visual": visual.artifact}, **kwargs)


def test_stage_writes_visual_text_and_descriptions(tmp_path, models, inputs):
    cfg = experiment(tmp_path, models, description_states=True)
    outcome = run(cfg, inputs)
    root = outcome.artifact.path
    # visual: every readable item, sorted by id, in the fixed layout (17 tokens x 64 per tiny CLIP image)
    visual = pq.read_table(sorted((root / "visual").glob("part-*.parquet")))
    assert visual.column("item_id").to_pylist() == ["a", "b", "c", "d", "t1"]
    assert visual.schema.field("features").type == pa.list_(pa.float32(), 17 * 64)
    assert set(visual.column("n_tokens").to_pylist()) == {17} and set(visual.column("dim").to_pylist()) == {64}
    errors = pq.read_table(root / "visual" / "errors.parquet").to_pylist()
    assert [e["item_id"] for e in errors] == ["bad"] and "empty" in errors[0]["reason"]
    encoder = VisionEncoder(models["vision"], device="cpu")
    expected = encoder.encode([Image.open(inputs["media"] / "c.png").convert("RGB")])[0]
    got = np.asarray(visual.column("features")[2].values.to_numpy()).reshape(17, 64)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

    # text: dataset captions + translations; b's translate-artifact MT replaced the shipped one
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models["text"])
    text = pq.read_table(root / "text" / "part-00000.parquet").to_pylist()
    de = {(r["caption_id"], r["kind"]): r for r in text if r["lang"] == "de"}
    assert set(de) == {("a0", "mt"), ("b0", "mt"), ("c0", "mt"), ("t1de", "human")}
    assert de[("b0", "mt")]["source"] == "translate"
    assert de[("b0", "mt")]["input_ids"] == tokenizer("ein grünes Quadrat")["input_ids"]
    assert de[("b0", "mt")]["n_tokens"] == len(de[("b0", "mt")]["input_ids"])
    assert sum(r["lang"] == "en" for r in text) == 6

    # descriptions: a's two views by view_id (objects, scene) joined with [SEP]; c's blank one is no description
    descriptions = pq.read_table(sorted((root / "descriptions").glob("part-*.parquet"))).to_pylist()
    by_item = {r["item_id"]: r for r in descriptions}
    assert sorted(by_item) == ["a", "b", "t1"] and by_item["a"]["views"] == ["objects", "scene"]
    assert by_item["a"]["input_ids"] == tokenizer("a red square [SEP] the shape is red")["input_ids"]
    assert by_item["a"]["input_ids"].count(tokenizer.sep_token_id) == 2
    # states: the frozen encoder's last hidden states of exactly those ids
    from transformers import AutoModel

    model = AutoModel.from_pretrained(models["text"]).eval()
    with torch.no_grad():
        states = model(input_ids=torch.tensor([by_item["a"]["input_ids"]])).last_hidden_state[0].numpy()
    np.testing.assert_allclose(np.asarray(by_item["a"]["states"], np.float32).reshape(-1, 64), states, atol=1e-5)
    assert outcome.artifact.manifest.summary["items_without_description"] == 3  # c, d, bad
    # DuckDB sees the three sub-tables through the lead's view globs
    import duckdb

    con = duckdb.connect()
    assert con.execute(f"SELECT count(*) FROM read_parquet('{root}/visual/part-*.parquet')").fetchone()[0] == 5
    assert (
        con.execute(f"SELECT count(*) FROM read_parquet('{root}/text/part-*.parquet') WHERE lang='de'").fetchone()[0]
        == 4
    )
    assert (
        con.execute(
            f"SELECT len(states) FROM read_parquet('{root}/descriptions/part-*.parquet') WHERE item_id='b'"
        ).fetchone()[0]
        == 64 * by_item["b"]["n_tokens"]
    )

    # and the reader joins it all into batches
    dataset = TrainingDataset(root, "de")
    assert len(dataset) == 3  # a, b, c have translations; bad has no visual; d no translation
    batch = dataset.get_batch(range(3))
    assert batch["visual"].shape == (3, 17, 64) and batch["desc_states"].shape[2] == 64
    assert load_eval_items(root, "test").item_ids == ["t1"]


def test_text_setting_change_reuses_visual_features(tmp_path, models, inputs, monkeypatch):
    first = run(experiment(tmp_path, models), inputs)
    visual = run_visual(experiment(tmp_path, models), inputs)
    assert visual.cache_hit

    def no_vision(*args, **kwargs):
        raise AssertionError("the vision tower must not run: the visual artifact should be reused")

    monkeypatch.setattr(vision_module, "VisionEncoder", no_vision)
    second = run(experiment(tmp_path, models, max_length=8, description_join="first"), inputs)
    assert second.artifact.key != first.artifact.key
    assert second.artifact.manifest.upstream["visual"] == visual.artifact.key
    for part in (first.artifact.path / "visual").glob("part-*.parquet"):
        # the very same file (a hard link to the visual artifact), not a recomputation or copy
        assert part.stat().st_ino == (second.artifact.path / "visual" / part.name).stat().st_ino
    text = pq.read_table(second.artifact.path / "text" / "part-00000.parquet")
    assert max(text.column("n_tokens").to_pylist()) <= 8
    # --force visual recomputes it (the links of the features artifacts survive)
    with pytest.raises(StageFailed, match="must not run"):
        run_visual(experiment(tmp_path, models), inputs, force=True)
    assert (first.artifact.path / "visual" / "part-00000.parquet").is_file()
    # a visual setting change does compute new visual features
    with pytest.raises(StageFailed, match="must not run"):
        run(experiment(tmp_path, models, visual_output="pooled"), inputs)


def test_visual_section_holds_only_visual_fields():
    visual_fields = set(VisualConfig.model_fields) - VisualConfig.NON_OUTPUT_FIELDS
    assert visual_fields == set(FeaturesConfig.VISUAL_FIELDS)
    base = FeaturesConfig(visual_source="import")

    def key_data(features):
        return resolve_section(VisualConfig.of(features), Fingerprinter())

    for change in (
        {"max_length": 10},
        {"description_states": True},
        {"text_shard_size": 5},
        {"batch_size": 1},
        {"visual_output": "pooled"},
        {"num_frames": 3},
    ):  # import: no tower, no frame sampling
        assert key_data(base.model_copy(update=change)) == key_data(base), change
    for change in ({"visual_dtype": "float16"}, {"shard_size": 3}):
        assert key_data(base.model_copy(update=change)) != key_data(base), change
    model = FeaturesConfig(vision_model="/nonexistent", visual_source="model")
    assert "vision_model" not in VisualConfig.of(model).unused_fields()
    assert "import_path" in VisualConfig.of(model).unused_fields()


def test_resume_after_a_failed_shard(tmp_path, models, inputs, monkeypatch):
    cfg = experiment(tmp_path, models)
    calls = {"n": 0}
    original = VisionEncoder.encode

    def failing_second_shard(self, images):
        calls["n"] += 1
        if calls["n"] == 3:  # call 1 probes the token shape, call 2 is shard 0
            raise RuntimeError("simulated crash in shard 1")
        return original(self, images)

    monkeypatch.setattr(VisionEncoder, "encode", failing_second_shard)
    with pytest.raises(StageFailed, match="simulated crash"):
        run(cfg, inputs)
    # the stage folder also holds LATEST and _claims; the unfinished artifact is the one key folder
    (cache,) = [p for p in (tmp_path / "artifacts" / "visual").iterdir() if p.is_dir() and not p.name.startswith("_")]
    assert [p.name for p in sorted(cache.glob("part-*.parquet"))] == ["part-00000.parquet"]
    kept = (cache / "part-00000.parquet").stat().st_mtime_ns
    monkeypatch.setattr(VisionEncoder, "encode", original)
    outcome = run(cfg, inputs)
    assert (cache / "part-00000.parquet").stat().st_mtime_ns == kept  # not recomputed
    assert (cache / "_manifest.json").is_file() and (outcome.artifact.path / "visual" / "part-00002.parquet").is_file()
    assert Artifact("visual", cache.name, cache).manifest.summary["shards_resumed"] == 1
    fresh = run(experiment(tmp_path / "fresh", models), inputs)
    for name in ("part-00000.parquet", "part-00001.parquet", "part-00002.parquet"):
        assert pq.read_table(outcome.artifact.path / "visual" / name).equals(
            pq.read_table(fresh.artifact.path / "visual" / name)
        )


def test_import_of_pre_extracted_features(tmp_path, models, inputs):
    rng = np.random.default_rng(0)
    arrays = {
        "a": rng.standard_normal((3, 8)),
        "b": rng.standard_normal(8),
        "c": rng.standard_normal((5, 8)),
        "d": rng.standard_normal((1, 8)),
        "t1": rng.standard_normal((2, 8)),
    }
    ids = np.array(list(arrays))
    # one .npz of all items must have one matrix: use [N, T, D] with equal T for it
    stacked = np.stack([np.resize(np.atleast_2d(a), (3, 8)) for a in arrays.values()]).astype(np.float32)
    np.savez(tmp_path / "all.npz", ids=ids, features=stacked)
    outcome = run(experiment(tmp_path, models, visual_source="import", import_path=str(tmp_path / "all.npz")), inputs)
    visual = pq.read_table(sorted((outcome.artifact.path / "visual").glob("part-*.parquet")))
    assert visual.schema.field("features").type == pa.list_(pa.float32())
    assert visual.column("item_id").to_pylist() == ["a", "b", "c", "d", "t1"]
    for row, item in enumerate(visual.column("item_id").to_pylist()):
        got = visual.column("features")[row].values.to_numpy()
        assert got.tobytes() == stacked[list(arrays).index(item)].tobytes()  # bit-equal
    errors = pq.read_table(outcome.artifact.path / "visual" / "errors.parquet").to_pylist()
    assert errors[0]["item_id"] == "bad" and "no row" in errors[0]["reason"]

    # per-item files through ITEMS.feature_path: .npy of [T, D] or [D]
    items = pq.read_table(inputs["dataset"].file("items.parquet")).to_pylist()
    for item in items:
        if item["item_id"] in arrays:
            item["feature_path"] = str(tmp_path / f"{item['item_id']}.npy")
            np.save(item["feature_path"], arrays[item["item_id"]].astype(np.float32))
    per_item = tmp_path / "dataset2"
    write_table(pa.Table.from_pylist(items, ITEMS), per_item / "items.parquet", ITEMS)
    (per_item / "captions.parquet").write_bytes(inputs["dataset"].file("captions.parquet").read_bytes())
    inputs2 = {**inputs, "dataset": finish_handmade("dataset", per_item, "dskey2")}
    outcome = run(experiment(tmp_path, models, visual_source="import"), inputs2)
    dataset = TrainingDataset(outcome.artifact.path, "de")
    sample = dataset[[dataset.item_ids[dataset[i]["item_index"]] for i in range(len(dataset))].index("c")]
    assert sample["visual"].numpy().tobytes() == arrays["c"].astype(np.float32).tobytes()
    batch = dataset.get_batch(range(len(dataset)))
    assert batch["visual"].shape[1] == 5 and batch["visual_mask"].sum(1).tolist() == [3, 1, 5]


def write_video(path, colours, size=32):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for colour in colours:
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), colour, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.mark.parametrize("output,tokens_per_frame", [("tokens", 17), ("pooled", 1)])
def test_video_frames_become_tokens_in_frame_order(tmp_path, models, inputs, output, tokens_per_frame):
    from leccr.media.decode import sample_frames

    video = tmp_path / "v.mp4"
    write_video(video, [(255, 0, 0)] * 4 + [(0, 0, 255)] * 4 + [(0, 255, 0)] * 4)
    items = [{"item_id": "v", "split": "train", "media_type": "video", "path": str(video), "feature_path": None}]
    folder = tmp_path / "videos"
    write_table(pa.Table.from_pylist(items, ITEMS), folder / "items.parquet", ITEMS)
    write_table(
        pa.Table.from_pylist(
            [
                {
                    "item_id": "v",
                    "caption_id": "v0",
                    "split": "train",
                    "lang": "en",
                    "text": "a red square",
                    "kind": "human",
                }
            ],
            CAPTIONS,
        ),
        folder / "captions.parquet",
        CAPTIONS,
    )
    inputs = {**inputs, "dataset": finish_handmade("dataset", folder, "videokey")}
    outcome = run(experiment(tmp_path, models, num_frames=3, visual_output=output), inputs)
    visual = pq.read_table(outcome.artifact.path / "visual" / "part-00000.parquet")
    assert visual.schema.field("features").type == pa.list_(pa.float32(), 3 * tokens_per_frame * 64)
    assert visual.column("n_tokens").to_pylist() == [3 * tokens_per_frame]
    encoder = VisionEncoder(models["vision"], output=output, device="cpu")
    expected = encoder.encode(sample_frames(video, num_frames=3)).reshape(-1, 64)
    got = visual.column("features")[0].values.to_numpy().reshape(-1, 64)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert not np.allclose(got[:tokens_per_frame], got[tokens_per_frame : 2 * tokens_per_frame])  # frames differ


def test_scale_out_slots_then_finish_equal_a_plain_run(tmp_path, models, inputs):
    from leccr.core.execute import run_stage_slot
    from leccr.core.jobs import key_parts

    cfg = experiment(tmp_path / "slots", models)
    parts = key_parts(cfg, "visual", {"dataset": inputs["dataset"]}, Fingerprinter())
    for slot in (0, 1):
        run_stage_slot(cfg, "visual", {"dataset": inputs["dataset"]}, parts, slot, 2)
    cache = tmp_path / "slots" / "artifacts" / "visual" / parts.key
    # every visual shard committed by one of the two slots; nothing finalised yet
    assert len(list(cache.glob("part-*.parquet"))) == 3 and not (cache / "_manifest.json").exists()
    finished = run(cfg, inputs)
    assert Artifact("visual", parts.key, cache).manifest.summary["shards_resumed"] == 3
    plain = run(experiment(tmp_path / "plain", models), inputs)
    for sub in ("visual", "text", "descriptions"):
        for part in sorted((plain.artifact.path / sub).glob("part-*.parquet")):
            assert pq.read_table(part).equals(pq.read_table(finished.artifact.path / sub / part.name)), part


def test_image_size_override_interpolates_positions(tmp_path, models, inputs):
    # 48 px with patch 8: 6 x 6 patches + CLS = 37 tokens (the tiny tower was built for 32 px: 17 tokens)
    outcome = run(experiment(tmp_path, models, image_size=48, visual_dtype="float16"), inputs)
    visual = pq.read_table(outcome.artifact.path / "visual" / "part-00000.parquet")
    assert visual.schema.field("features").type == pa.list_(pa.float16(), 37 * 64)
    assert visual.column("n_tokens").to_pylist() == [37, 37]


def _caption_work_reference(captions, translations, items):
    """caption_work as it was written with Python rows (the reference for the Arrow version)."""
    split_of_item = {item["item_id"]: item["split"] for item in items}
    translated = {(r["caption_id"], r["lang"]) for r in translations.select(["caption_id", "lang"]).to_pylist()}
    split_of_caption, work = {}, []
    for row in captions.to_pylist():
        if row["lang"] == "en":
            split_of_caption[row["caption_id"]] = row["split"]
        if row["kind"] == "mt" and (row["caption_id"], row["lang"]) in translated:
            continue
        work.append({**row, "source": "dataset"})
    for row in translations.select(["item_id", "caption_id", "lang", "text"]).to_pylist():
        split = split_of_caption.get(row["caption_id"], split_of_item.get(row["item_id"]))
        if split is not None:
            work.append({**row, "split": split, "kind": "mt", "source": "translate"})
    return sorted(work, key=lambda r: (r["item_id"], r["caption_id"], r["lang"], r["kind"], r["source"]))


def test_caption_work_in_arrow_is_the_python_rows_work():
    """Translate's MT replaces the shipped MT of that caption and language; a translation takes its English
    caption's split, else its item's; one of an item the dataset no longer has is left out; the order is
    (item, caption, language, kind, source) with non-ASCII ids sorted as Python sorts them."""
    from leccr.schemas.dataset import CAPTIONS
    from leccr.schemas.translate import TRANSLATIONS
    from leccr.stages.features import caption_work

    captions = pa.Table.from_pylist(
        [
            {"item_id": "b", "caption_id": "b#0", "split": "train", "lang": "en", "text": "a dog", "kind": "human"},
            {
                "item_id": "b",
                "caption_id": "b#0",
                "split": "train",
                "lang": "de",
                "text": "ein Hund (shipped)",
                "kind": "mt",
            },
            {"item_id": "b", "caption_id": "b#0", "split": "train", "lang": "fr", "text": "un chien", "kind": "mt"},
            {"item_id": "a", "caption_id": "a#0", "split": "test", "lang": "en", "text": "a cat", "kind": "human"},
            {"item_id": "a", "caption_id": "a#0", "split": "test", "lang": "de", "text": "eine Katze", "kind": "human"},
            {"item_id": "ä", "caption_id": "ä#0", "split": "val", "lang": "en", "text": "x", "kind": "human"},
        ],
        schema=CAPTIONS,
    )
    common = {"source_text": "", "engine": "import", "model": "m", "model_digest": None}
    translations = pa.Table.from_pylist(
        [
            {"item_id": "b", "caption_id": "b#0", "lang": "de", "text": "ein Hund (translated)", **common},
            {"item_id": "c", "caption_id": "c#9", "lang": "de", "text": "split from its item", **common},
            {"item_id": "z", "caption_id": "z#9", "lang": "de", "text": "an item no longer there", **common},
        ],
        schema=TRANSLATIONS,
    )
    items = [{"item_id": i, "split": s} for i, s in (("a", "test"), ("b", "train"), ("c", "val"), ("ä", "val"))]
    work = [dict(row) for row in caption_work(captions, translations, items)]
    assert work == _caption_work_reference(captions, translations, items)
    assert [(r["caption_id"], r["lang"], r["source"]) for r in work if r["lang"] == "de"] == [
        ("a#0", "de", "dataset"),
        ("b#0", "de", "translate"),
        ("c#9", "de", "translate"),
    ]
