"""index: the collection embedded by every trained method, for `leccr search` and `leccr serve`.

For the visual items of the chosen splits (schemas/index.py):

1. items.parquet: each item's media path relative to the dataset root, its captions (every language)
   and its MLLM description, for showing hits;
2. per method, embeddings.parquet: the global embedding, and the slot embeddings where the method has
   them, encoded by the same functions evaluate uses (`leccr.models.encode.encode_items`), chunk by
   chunk of `batch_size` items so a large collection never sits in memory as padded tokens;
3. per method, index.json: the inference score's alpha, the query languages (English + the trained
   ones), the tokenizer's max_length, and — for a fused score (alpha < 1) — the min/max of the global
   and slot matrices of the `calibration_split` captions against the indexed items, per language,
   computed as evaluate computes them (`leccr.stages.evaluate.whole_ranges`): with the test split indexed and
   calibrated on, a search ranks exactly as evaluate's fused score does;
4. with `index.ann` set, vectors.faiss: a FAISS IVF or HNSW index over the global embeddings.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from leccr.config import EvaluateConfig, ExperimentConfig, IndexConfig, Section
from leccr.core.context import StageContext
from leccr.core.failures import StageFailed
from leccr.core.io import atomic_write_text
from leccr.core.stage import StageDef
from leccr.schemas.core import read_table, write_table
from leccr.schemas.dataset import CAPTIONS, ITEMS
from leccr.schemas.index import CAPTION, INDEX_ITEMS, embeddings_schema

if TYPE_CHECKING:  # torch is imported where it is used: planning a run never loads it
    import torch

ITEMS_FILE = "items.parquet"
EMBEDDINGS_FILE = "embeddings.parquet"
INFO_FILE = "index.json"
ANY_LANGUAGE = "*"  # ranges over every calibration language: for a query language without captions there


def section(cfg: ExperimentConfig) -> Section:
    return cfg.index


def _chosen_items(tables, splits: list[str] | None) -> list[tuple[str, int]]:
    """(split, number of items) in the order indexed: the configured splits, else every split present."""
    split_column = tables.visual.column("split")
    present = list(dict.fromkeys(split_column.to_pylist()))
    wanted = splits if splits is not None else present
    missing = [split for split in wanted if split not in present]
    if missing:
        raise StageFailed(f"index: no visual features for split(s) {missing} (splits with features: {present})")
    return [(split, int(pc.sum(pc.equal(split_column, split)).as_py() or 0)) for split in wanted]


def _item_table(ctx: StageContext, item_ids: list[str], splits: list[str]) -> pa.Table:
    from leccr.evaluation.scoring import _description_texts

    dataset = ctx.inputs["dataset"]
    items = read_table(dataset.file("items.parquet"), ITEMS, columns=["item_id", "media_type", "path"])
    rows = {row["item_id"]: row for row in items.to_pylist()}
    described = _description_texts(ctx, item_ids)
    sources = description_sources(ctx.inputs["describe"], set(item_ids))
    random_weights = describe_model_is_random(ctx.inputs["describe"])
    no_source = {"engine": None, "model": None}
    return pa.table({
        "item_id": pa.array(item_ids, pa.string()),
        "split": pa.array(splits, pa.string()),
        "media_type": pa.array([rows.get(item, {}).get("media_type", "image") for item in item_ids], pa.string()),
        # as items.parquet holds it: relative to the dataset root
        "path": pa.array([rows.get(item, {}).get("path") for item in item_ids], pa.string()),
        "captions": captions_by_item(read_table(dataset.file("captions.parquet"), CAPTIONS), item_ids),
        "description": pa.array([described.get(item) for item in item_ids], pa.string()),
        "description_engine": pa.array([sources.get(item, no_source)["engine"] for item in item_ids], pa.string()),
        "description_model": pa.array([sources.get(item, no_source)["model"] for item in item_ids], pa.string()),
        "description_random_weights": pa.array([random_weights if item in sources else None for item in item_ids],
                                               pa.bool_()),
    }, schema=INDEX_ITEMS)


def captions_by_item(captions: pa.Table, item_ids: list[str]) -> pa.ListArray:
    """Each of `item_ids`' captions (lang, kind, text), in captions.parquet's order, as one list column
    in `item_ids`' order: built in Arrow, since a collection's captions are many (20 per item at
    Multi30K's size) and as Python rows they would cost ~0.5 KB each."""
    position = pc.index_in(captions.column("item_id"), value_set=pa.array(item_ids, pa.string()))
    keep = pc.is_valid(position)
    position = position.filter(keep).to_numpy(zero_copy_only=False)
    kept = captions.filter(keep)
    order = np.argsort(position, kind="stable")  # by item, each item's captions in table order
    values = pa.StructArray.from_arrays([kept.column(name).combine_chunks().take(pa.array(order))
                                         for name in ("lang", "kind", "text")], fields=list(CAPTION))
    offsets = np.zeros(len(item_ids) + 1, dtype=np.int32)
    np.cumsum(np.bincount(position, minlength=len(item_ids)), out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values, type=INDEX_ITEMS.field("captions").type)


def description_sources(describe, wanted: set[str]) -> dict[str, dict]:
    """Item id -> {"engine", "model"} of its description rows, as the describe artifact records them
    (every view of an item comes from one engine and model)."""
    import pyarrow.parquet as pq

    sources: dict[str, dict] = {}
    wanted_ids = pa.array(sorted(wanted), pa.string())
    for part in describe.parts():
        table = pq.read_table(part, columns=["item_id", "engine", "model"])
        for row in table.filter(pc.is_in(table.column("item_id"), wanted_ids)).to_pylist():
            sources.setdefault(row["item_id"], {"engine": row["engine"], "model": row["model"]})
    return sources


def describe_model_is_random(describe) -> bool | None:
    """Whether the describe artifact's model is one of leccr's tiny random-weight models (its folder holds
    the builder's recipe, leccr/tiny_models): such text is noise, and search shows it marked as such.
    None when no model made the descriptions (import) or its folder is no longer there to tell."""
    from leccr.runtime.hub import ModelNotFound, model_path
    from leccr.tiny_models._save import read_recipe

    config = describe.manifest.config
    model = config.get("model")
    if not model or config.get("engine") == "import":
        return None
    try:
        return read_recipe(model_path(model)) is not None
    except (ModelNotFound, OSError):
        return None


def encode_collection(model, tables, chosen: list[tuple[str, int]], batch_size: int, device: torch.device
                      ) -> tuple[list[str], list[str], torch.Tensor, torch.Tensor | None]:
    """(item ids, their splits, global [N, E], slots [N, N_q, E] or None) of every chosen item, in order."""
    import torch

    from leccr.data import load_eval_items
    from leccr.models.encode import encode_items

    ids, splits, globals_, slots = [], [], [], []
    model.eval().to(device)
    for split, count in chosen:
        for start in range(0, count, batch_size):
            items = load_eval_items(tables, split, chunk=slice(start, start + batch_size))
            global_emb, slot_emb = encode_items(model, items, batch_size, device)
            ids += items.item_ids
            splits += [split] * len(items.item_ids)
            globals_.append(global_emb)
            if slot_emb is not None:
                slots.append(slot_emb)
    return ids, splits, torch.cat(globals_), (torch.cat(slots) if slots else None)


def calibration_split(ctx: StageContext, cfg: IndexConfig):
    """The calibration split's captions (human where the split has them, else machine translations, as
    evaluate), loaded once for every method."""
    from leccr.evaluation.scoring import load_split

    try:
        return load_split(ctx, EvaluateConfig(split=cfg.calibration_split))
    except StageFailed as error:
        raise StageFailed(f"index: the fused score (alpha < 1) needs calibration captions from split "
                          f"{cfg.calibration_split!r} (index.calibration_split): {error}") from None


def calibration_ranges(data, cfg: IndexConfig, model, visual_global: torch.Tensor,
                       visual_slots: torch.Tensor, device: torch.device) -> dict[str, dict[str, list[float]]]:
    """Per language (and ANY_LANGUAGE): min/max of the global and slot scores of the calibration split's
    captions (`calibration_split`) vs the indexed items."""
    from leccr.models.base import merge_ranges
    from leccr.models.encode import encode_texts
    from leccr.evaluation.scoring import whole_ranges

    ranges: dict[str, dict[str, tuple[float, float]]] = {}
    for lang, language in data.languages.items():
        texts = encode_texts(model, language.ids, language.mask, cfg.batch_size, device)
        ranges[lang] = whole_ranges(texts.to(device), visual_global.to(device), visual_slots.to(device), cfg.chunk_size)
    merged: dict[str, tuple[float, float]] = {}
    for part in ranges.values():
        merged = merge_ranges(merged, part)
    ranges[ANY_LANGUAGE] = merged
    return {lang: {part: list(bounds) for part, bounds in parts.items()} for lang, parts in ranges.items()}


def _fixed_list(matrix: np.ndarray) -> pa.FixedSizeListArray:
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


def run(ctx: StageContext) -> None:
    from leccr.data import FeatureTables
    from leccr.runtime.device import resolve_device
    from leccr.engines.cache import Lazy
    from leccr.engines.vectors import build_faiss, faiss_missing
    from leccr.config import method_sort_key
    from leccr.evaluation.scoring import load_model

    cfg: IndexConfig = ctx.section  # type: ignore[assignment]
    started = time.perf_counter()
    if cfg.ann is not None and (reason := faiss_missing()):
        raise StageFailed(f"index: index.ann is {cfg.ann.kind}, but {reason}")
    device = resolve_device(cfg.device)
    train = ctx.inputs["train"]
    available = sorted(train.methods, key=method_sort_key)
    methods = cfg.methods if cfg.methods is not None else available
    unknown = [m for m in methods if m not in available]
    if unknown or not methods:
        raise StageFailed(f"index: method(s) {unknown or methods} not trained in this run "
                          f"(trained methods: {available}); add them to train.methods")
    tables = FeatureTables.open(ctx.inputs["features"].path)
    chosen = _chosen_items(tables, cfg.splits)
    summary: dict[str, dict] = {}
    item_ids: list[str] | None = None
    calibration = Lazy(lambda: calibration_split(ctx, cfg))  # only methods with a fused score need it
    for method in methods:
        method_dir = train.method_dir(method)
        model = load_model(method_dir)
        ids, splits, visual_global, visual_slots = encode_collection(model, tables, chosen, cfg.batch_size, device)
        if item_ids is None:
            item_ids = ids
            write_table(_item_table(ctx, ids, splits), ctx.out_dir / ITEMS_FILE, INDEX_ITEMS)
        alpha = cfg.alpha if cfg.alpha is not None else float(model.config.score_alpha)
        if visual_slots is None:
            alpha = 1.0  # no slots (baseline, cl2cm, leccr with slots ablated): the score is the global cosine
        out = ctx.out_dir / method
        embed_dim = visual_global.shape[1]
        slot_values = None if visual_slots is None else visual_slots.shape[1] * visual_slots.shape[2]
        columns = {"method": [method] * len(ids), "item_id": ids, "split": splits,
                   "path": _item_paths(ctx.out_dir / ITEMS_FILE), "embedding": _fixed_list(visual_global.numpy())}
        if visual_slots is not None:
            columns["slots"] = _fixed_list(visual_slots.reshape(len(ids), -1).numpy())
        schema = embeddings_schema(embed_dim, slot_values)
        write_table(pa.table(columns), out / EMBEDDINGS_FILE, schema)
        train_info = json.loads((method_dir / "train_info.json").read_text(encoding="utf-8"))
        info = {
            "method": method,
            "alpha": alpha,
            "embed_dim": embed_dim,
            "num_slots": None if visual_slots is None else int(visual_slots.shape[1]),
            "items": len(ids),
            "languages": ["en"] + [lang for lang in train_info.get("languages", []) if lang != "en"],
            "max_length": int(tables.info["max_length"]),
            "calibration_split": cfg.calibration_split if alpha < 1.0 else None,
            "ranges": (calibration_ranges(calibration.get(), cfg, model, visual_global, visual_slots, device)
                       if alpha < 1.0 else None),
            "ann": cfg.ann.model_dump(mode="json") if cfg.ann is not None else None,
        }
        if cfg.ann is not None:
            build_faiss(visual_global.numpy(), cfg.ann).save(out)
        atomic_write_text(out / INFO_FILE, json.dumps(info, indent=2, sort_keys=True) + "\n")
        summary[method] = {"items": len(ids), "alpha": alpha, "slots": info["num_slots"]}
        ctx.log.info("index: %s: %d items, alpha %.2f, %s", method, len(ids), alpha,
                     f"FAISS {cfg.ann.kind}" if cfg.ann is not None else "exact search")
        del model
    ctx.summary.update(methods=summary, splits=[split for split, _ in chosen],
                       backend=cfg.ann.kind if cfg.ann is not None else "exact",
                       seconds=round(time.perf_counter() - started, 3))


def _item_paths(items_file: Path) -> list[str | None]:
    return read_table(items_file, INDEX_ITEMS, columns=["path"]).column("path").to_pylist()


def key_config(cfg: ExperimentConfig, fingerprints) -> dict:
    from leccr.runtime.device import resolved_numerics

    return {"numerics": resolved_numerics(cfg, "index", cfg.index.device)}


# describe: the description texts shown with hits
STAGE = StageDef(name="index", upstream=("dataset", "describe", "features", "train"),
                 reads={"dataset": ("items.parquet", "captions.parquet"), "describe": ("*",), "features": ("*",),
                        "train": ("*",)},
                 section=section, run=run, key_config=key_config)
