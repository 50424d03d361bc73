"""The features readers on hand-built artifacts: bit-exact round trips, zero-copy views, id joins,
missing descriptions (drop / empty), batch contract, evaluation loaders."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from leccr.data import FeatureCollate, FeatureTables, TrainingDataset, load_eval_captions, load_eval_items
from leccr.features.storage import fixed_list_column, float_list_column, ids_column
from leccr.schemas.core import write_table
from leccr.schemas.features import TEXT_TOKENS, description_schema, visual_schema

PAD = 0


def special_floats(shape, seed):
    """Random float32 values plus the ones a lossy path would change: -0.0, inf, subnormals, NaN payloads."""
    values = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    flat = values.reshape(-1)
    special = np.array([-0.0, np.inf, -np.inf, 1e-45, 3.4e38, 0.0], np.float32)
    special[5] = np.frombuffer(np.uint32(0x7FC00123).tobytes(), np.float32)[0]  # NaN with a payload
    count = min(flat.size, special.size)
    flat[:count] = special[:count]
    return values


def write_artifact(root, visual, text_rows, desc_rows, *, fixed=True, visual_dtype="float32", states_dim=None):
    """A features artifact folder written with the stage's own column helpers and schemas.

    visual: {item_id: (split, array [n, d])}; text_rows: dicts of TEXT_TOKENS minus n_tokens, with
    `ids`; desc_rows: {item_id: (split, ids)}.
    """
    arrays = [a for _, a in visual.values()]
    features = fixed_list_column(arrays, visual_dtype) if fixed else float_list_column(arrays, visual_dtype)
    size = arrays[0].size if fixed else None
    write_table(
        pa.table(
            {
                "item_id": list(visual),
                "split": [s for s, _ in visual.values()],
                "media_type": ["image"] * len(visual),
                "n_tokens": pa.array([a.shape[0] for a in arrays], pa.int32()),
                "dim": pa.array([a.shape[1] for a in arrays], pa.int32()),
                "features": features,
            }
        ),
        root / "visual" / "part-00000.parquet",
        visual_schema(visual_dtype, size),
        row_group_size=2,
    )
    write_table(
        pa.table(
            {
                **{k: [r[k] for r in text_rows] for k in ("item_id", "caption_id", "split", "lang", "kind", "source")},
                "n_tokens": pa.array([len(r["ids"]) for r in text_rows], pa.int32()),
                "input_ids": ids_column([r["ids"] for r in text_rows]),
            }
        ),
        root / "text" / "part-00000.parquet",
        TEXT_TOKENS,
    )
    schema = description_schema("float32" if states_dim else None)

    def desc_table(entries):
        columns = {
            "item_id": pa.array([k for k, _ in entries], pa.string()),
            "split": pa.array([s for _, (s, _) in entries], pa.string()),
            "views": pa.array([["v"] if k else [] for k, _ in entries], pa.list_(pa.string())),
            "n_tokens": pa.array([len(ids) for _, (_, ids) in entries], pa.int32()),
            "input_ids": ids_column([ids for _, (_, ids) in entries]),
        }
        if states_dim:
            states = [np.full((len(ids), states_dim), float(ids[0]), np.float32) for _, (_, ids) in entries]
            columns["dim"] = pa.array([states_dim] * len(entries), pa.int32())
            columns["states"] = float_list_column(states, "float32")
        return pa.table(columns)

    write_table(desc_table(list(desc_rows.items())), root / "descriptions" / "part-00000.parquet", schema)
    write_table(desc_table([("", ("", [2, 3]))]), root / "descriptions" / "empty.parquet", schema)
    info = {
        "pad_token_id": PAD,
        "cls_token_id": 2,
        "sep_token_id": 3,
        "descriptions": {"states": bool(states_dim), "states_dtype": "float32" if states_dim else None},
    }
    (root / "features_info.json").write_text(json.dumps(info))
    return root


def caption(item, cid, split, lang, kind, ids, source="dataset"):
    return {
        "item_id": item,
        "caption_id": cid,
        "split": split,
        "lang": lang,
        "kind": kind,
        "source": source,
        "ids": ids,
    }


@pytest.fixture
def joined(tmp_path):
    """Train items a (2 English captions), b, c (no description), d (no translation), e (no visual);
    test items t1, t2 (t2 without description)."""
    visual = {
        k: (split, special_floats((3, 4), seed))
        for seed, (k, split) in enumerate(
            [("a", "train"), ("b", "train"), ("c", "train"), ("d", "train"), ("t1", "test"), ("t2", "test")]
        )
    }
    text = [
        caption("a", "a0", "train", "en", "human", [2, 10, 3]),
        caption("a", "a1", "train", "en", "human", [2, 11, 12, 3]),
        caption("b", "b0", "train", "en", "human", [2, 13, 3]),
        caption("c", "c0", "train", "en", "human", [2, 14, 3]),
        caption("d", "d0", "train", "en", "human", [2, 15, 3]),
        caption("e", "e0", "train", "en", "human", [2, 16, 3]),
        caption("a", "a0", "train", "de", "mt", [2, 20, 3], "translate"),
        caption("a", "a1", "train", "de", "mt", [2, 21, 22, 23, 3], "translate"),
        caption("b", "b0", "train", "de", "mt", [2, 24, 3]),
        caption("c", "c0", "train", "de", "mt", [2, 25, 3], "translate"),
        caption("e", "e0", "train", "de", "mt", [2, 26, 3], "translate"),
        caption("a", "a0", "train", "fr", "mt", [2, 30, 3], "translate"),
        caption("t1", "t1en", "test", "en", "human", [2, 40, 3]),
        caption("t2", "t2en", "test", "en", "human", [2, 41, 3]),
        caption("t2", "t2de", "test", "de", "human", [2, 42, 43, 3]),
        caption("t1", "t1de", "test", "de", "human", [2, 44, 3]),
    ]
    descriptions = {
        "a": ("train", [2, 50, 51, 3, 52, 3]),
        "b": ("train", [2, 53, 3]),
        "d": ("train", [2, 54, 3]),
        "t1": ("test", [2, 55, 3]),
    }
    return write_artifact(tmp_path / "features", visual, text, descriptions, states_dim=2), visual


@pytest.mark.parametrize("arrow_cache", [True, False])
@pytest.mark.parametrize("fixed,dtype", [(True, "float32"), (False, "float32"), (True, "float16"), (False, "float16")])
def test_visual_values_round_trip_bit_exact(tmp_path, arrow_cache, fixed, dtype):
    shapes = [(3, 4)] * 3 if fixed else [(3, 4), (1, 4), (5, 4)]
    with np.errstate(over="ignore"):  # 3.4e38 becomes inf in float16: still a value to keep exactly
        arrays = [
            special_floats(shape, seed).astype(np.float16 if dtype == "float16" else np.float32)
            for seed, shape in enumerate(shapes)
        ]
    visual = {f"i{n}": ("train", a) for n, a in enumerate(arrays)}
    text = [caption(k, k + "c", "train", "en", "human", [2, 3]) for k in visual]
    root = write_artifact(tmp_path / "f", visual, text, {}, fixed=fixed, visual_dtype=dtype)
    tables = FeatureTables.open(root, arrow_cache=arrow_cache)
    assert tables.visual_values.fixed is fixed
    for row, array in enumerate(arrays):
        got = tables.visual_tokens(row)
        assert got.shape == array.shape and got.dtype == array.dtype
        bits = np.uint16 if dtype == "float16" else np.uint32
        np.testing.assert_array_equal(got.view(bits), array.view(bits))  # NaN payloads and -0.0 included
    assert (root / ".arrow-cache" / "visual").is_dir() is arrow_cache


def test_arrow_cache_is_memory_mapped_and_views_are_zero_copy(joined):
    root, _ = joined
    tables = FeatureTables.open(root)
    files = list((root / ".arrow-cache" / "visual").glob("part-00000-*.arrow"))
    assert len(files) == 1
    dataset = TrainingDataset(tables, "de")
    sample = dataset[0]
    # The tensor points into one of the Arrow chunks' value buffers (no copy was made).
    buffers = [chunk.flatten().buffers()[1] for chunk in tables.visual.column("features").chunks]
    pointer = sample["visual"].data_ptr()
    assert any(b.address <= pointer < b.address + b.size for b in buffers)
    ids_buffers = [chunk.values.buffers()[1] for chunk in tables.text.column("input_ids").chunks]
    assert any(b.address <= sample["en_ids"].data_ptr() < b.address + b.size for b in ids_buffers)
    # A second open reuses the same cache file (not re-converted).
    mtime = files[0].stat().st_mtime_ns
    FeatureTables.open(root)
    assert files[0].stat().st_mtime_ns == mtime


def test_training_joins_captions_translations_and_descriptions_empty_mode(joined):
    root, visual = joined
    dataset = TrainingDataset(root, "de", missing_descriptions="empty")
    # e: no visual; d: no translation. a has two captions, c has no description (empty filled in).
    assert dataset.dropped == {"no_visual": 1, "no_translation": 1, "no_description": 0}
    assert dataset.item_ids == ["a", "b", "c", "d"]
    pairs = [
        (dataset.item_ids[s["item_index"]], s["en_ids"].tolist(), s["tgt_ids"].tolist(), s["desc_ids"].tolist())
        for s in (dataset[i] for i in range(len(dataset)))
    ]
    assert pairs == [
        ("a", [2, 10, 3], [2, 20, 3], [2, 50, 51, 3, 52, 3]),
        ("a", [2, 11, 12, 3], [2, 21, 22, 23, 3], [2, 50, 51, 3, 52, 3]),
        ("b", [2, 13, 3], [2, 24, 3], [2, 53, 3]),
        ("c", [2, 14, 3], [2, 25, 3], [2, 3]),  # the empty description's encoding
    ]
    np.testing.assert_array_equal(dataset[3]["visual"].numpy().view(np.uint32), visual["c"][1].view(np.uint32))
    assert dataset.without_description == 1


def test_training_drop_mode_removes_items_without_description(joined):
    root, _ = joined
    dataset = TrainingDataset(root, "de", missing_descriptions="drop")
    assert dataset.dropped["no_description"] == 1
    assert [dataset.item_ids[dataset[i]["item_index"]] for i in range(len(dataset))] == ["a", "a", "b"]
    with pytest.raises(ValueError, match="missing_descriptions"):
        TrainingDataset(root, "de", missing_descriptions="skip")


def test_other_language_and_no_sample_error(joined):
    root, _ = joined
    fr = TrainingDataset(root, "fr")
    assert len(fr) == 1 and fr[0]["tgt_ids"].tolist() == [2, 30, 3]
    with pytest.raises(ValueError, match="no training sample.*'ja'"):
        TrainingDataset(root, "ja")


def test_batch_contract_padding_masks_and_states(joined):
    root, visual = joined
    dataset = TrainingDataset(root, "de")
    batch = FeatureCollate(PAD)([dataset[i] for i in range(4)])
    assert batch["visual"].shape == (4, 3, 4) and batch["visual"].dtype == torch.float32
    assert batch["visual_mask"].all()
    assert batch["en_ids"].dtype == torch.long and batch["en_ids"].shape == (4, 4)
    assert batch["en_ids"][0].tolist() == [2, 10, 3, PAD]
    assert batch["en_mask"].tolist()[0] == [True, True, True, False]
    assert batch["tgt_ids"].shape == (4, 5) and batch["tgt_mask"].sum(1).tolist() == [3, 5, 3, 3]
    assert batch["desc_ids"].shape == (4, 6) and batch["desc_mask"].sum(1).tolist() == [6, 6, 3, 2]
    # States: the hand-built ones repeat the first id of the description; padding is zero.
    assert batch["desc_states"].shape == (4, 6, 2)
    assert batch["desc_states"][2, :3].eq(2.0).all() and batch["desc_states"][2, 3:].eq(0).all()
    assert batch["item_index"].tolist() == [0, 0, 1, 2]
    # The batched path gives the very same tensors.
    fast = dataset.get_batch([0, 1, 2, 3])
    assert fast.keys() == batch.keys()
    for key in batch:
        assert torch.equal(
            fast[key].view(torch.int32) if key in ("visual", "desc_states") else fast[key],
            batch[key].view(torch.int32) if key in ("visual", "desc_states") else batch[key],
        ), key


def test_variable_length_visual_tokens_are_padded_with_mask(tmp_path):
    visual = {"a": ("train", np.ones((2, 3), np.float32)), "b": ("train", np.full((4, 3), 2.0, np.float32))}
    text = [
        caption("a", "a0", "train", "en", "human", [2, 3]),
        caption("a", "a0", "train", "de", "mt", [2, 3]),
        caption("b", "b0", "train", "en", "human", [2, 3]),
        caption("b", "b0", "train", "de", "mt", [2, 3]),
    ]
    root = write_artifact(tmp_path / "f", visual, text, {}, fixed=False)
    dataset = TrainingDataset(root, "de")
    batch = dataset.get_batch([0, 1])
    assert batch["visual"].shape == (2, 4, 3)
    assert batch["visual_mask"].tolist() == [[True, True, False, False], [True] * 4]
    assert batch["visual"][0, 2:].eq(0).all() and batch["visual"][1].eq(2.0).all()


def test_eval_loaders(joined):
    root, visual = joined
    items = load_eval_items(root, "test")
    assert items.item_ids == ["t1", "t2"]
    assert items.has_description.tolist() == [True, False]
    assert items.desc_ids.tolist() == [[2, 55, 3], [2, 3, PAD]]
    assert items.desc_states.shape == (2, 3, 2)
    np.testing.assert_array_equal(items.visual[1].numpy().view(np.uint32), visual["t2"][1].view(np.uint32))
    de = load_eval_captions(root, "de", items, "test")
    assert de.caption_ids == ["t2de", "t1de"] and de.item_index.tolist() == [1, 0]
    assert de.ids.tolist() == [[2, 42, 43, 3], [2, 44, 3, PAD]] and de.mask.sum(1).tolist() == [4, 3]
    en = load_eval_captions(root, "en", items, "test")
    assert en.item_ids == ["t1", "t2"]
    with pytest.raises(ValueError, match="no mt caption"):
        load_eval_captions(root, "de", items, "test", kind="mt")


def test_open_rejects_unfinished_artifact(tmp_path):
    with pytest.raises(FileNotFoundError, match="features_info.json"):
        FeatureTables.open(tmp_path)


def test_dataset_pickles_by_folder_for_dataloader_workers(joined):
    import pickle

    root, _ = joined
    dataset = TrainingDataset(root, "de")
    payload = pickle.dumps(dataset)
    assert len(payload) < 20_000  # the folder and row indices, not the feature buffers
    copy = pickle.loads(payload)
    for key, value in dataset[1].items():
        # bytes, not torch.equal: the hand-built features hold NaN
        assert (
            copy[1][key].numpy().tobytes() == value.numpy().tobytes()
            if torch.is_tensor(value)
            else copy[1][key] == value
        ), key
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=2, collate_fn=dataset.collate_fn(), num_workers=2, multiprocessing_context="spawn"
    )
    batches = list(loader)
    assert [b["item_index"].tolist() for b in batches] == [[0, 0], [1, 2]]
