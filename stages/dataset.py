"""dataset: read a dataset folder through its format adapter into `items.parquet` and `captions.parquet`.

Every later stage reads the dataset through this artifact, so its key (which fingerprints the
folder's content) is upstream of everything: editing an annotation file reruns the whole DAG.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from leccr.config import DatasetConfig, ExperimentConfig
from leccr.store import StageContext
from schemas.dataset import CAPTIONS, ITEMS

UPSTREAM: tuple[str, ...] = ()


def section(cfg: ExperimentConfig) -> DatasetConfig:
    return cfg.dataset


def cap_items(items: pa.Table, captions: pa.Table, per_split: int) -> tuple[pa.Table, pa.Table]:
    """Keep the first `per_split` items (by id) of each split, and their captions."""
    kept = []
    for split in sorted(set(items.column("split").to_pylist())):
        ids = sorted(pc.filter(items.column("item_id"), pc.equal(items.column("split"), split)).to_pylist())
        kept.extend(ids[:per_split])
    keep = pa.array(kept, pa.string())
    return (items.filter(pc.is_in(items.column("item_id"), keep)),
            captions.filter(pc.is_in(captions.column("item_id"), keep)))


def run(ctx: StageContext) -> None:
    from leccr.datasets import load_dataset

    cfg: DatasetConfig = ctx.section
    tables = load_dataset(cfg.format, Path(cfg.path), cfg.languages, cfg.options)
    items, captions = tables.items, tables.captions
    if cfg.max_items_per_split is not None:
        items, captions = cap_items(items, captions, cfg.max_items_per_split)
    items = items.sort_by("item_id")
    captions = captions.sort_by([("item_id", "ascending"), ("lang", "ascending"), ("caption_id", "ascending")])
    ctx.write("items.parquet", items, ITEMS)
    ctx.write("captions.parquet", captions, CAPTIONS)
    ctx.summary.update(
        format=cfg.format,
        items_per_split={s: items.column("split").to_pylist().count(s) for s in sorted(set(items.column("split").to_pylist()))},
        captions_per_lang={lang: captions.column("lang").to_pylist().count(lang)
                           for lang in sorted(set(captions.column("lang").to_pylist()))},
    )
