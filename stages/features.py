"""features: visual features, caption tokens and description tokens (+ frozen states), cached as Parquet.

Three sub-tables of one artifact (layouts in schemas/features.py):

    visual/        one row per visual item: [n_tokens, dim] from a vision tower, or imported arrays
    text/          one row per caption (English, human target-language, machine translations): token ids
    descriptions/  one row per described item: token ids of its description view(s) [+ encoder states]

`visual/` holds the files of the upstream `visual` stage's artifact, hard-linked (copied where the
filesystem cannot link): the visual features depend on a few fields only and are the expensive part,
so they are a stage of their own (stages/visual.py) that a change of the text side reuses. Shards are
immutable once committed, so sharing them is safe; a features artifact stays a complete,
self-contained folder (DuckDB and the readers see plain files).

Text side: one tokenizer for all text (the shared multilingual encoder). A dataset's shipped machine
translation of a caption is kept only where the translate artifact has none for that caption and
language (the translate artifact wins). Descriptions: the configured views (default: all, by view_id)
joined with [SEP] ("concat") or the first one ("first"); an item with no description gets no row, and
`descriptions/empty.parquet` holds the encoding of an empty description for readers that fill in.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from leccr.config import ExperimentConfig, FeaturesConfig
from leccr.core.artifact import ReadView
from leccr.core.context import StageContext
from leccr.core.io import atomic_write_text
from leccr.core.rows import TableRows
from leccr.core.shards import ShardJob, ShardResult
from leccr.core.stage import StageDef
from leccr.engines.cache import Lazy
from leccr.features.storage import float_list_column, ids_column
from leccr.schemas.core import read_table, write_table
from leccr.schemas.dataset import CAPTIONS, ITEMS
from leccr.schemas.describe import DESCRIPTIONS
from leccr.schemas.features import TEXT_TOKENS, description_schema
from leccr.schemas.translate import TRANSLATIONS

INFO_FILE = "features_info.json"
EMPTY_DESCRIPTION_FILE = "empty.parquet"


def section(cfg: ExperimentConfig) -> FeaturesConfig:
    return cfg.features


def check_config(cfg: FeaturesConfig) -> None:
    if cfg.tokenizer is None and cfg.text_model is None:
        raise ValueError("features.text_model (or features.tokenizer) is required: captions are tokenised with it")
    if cfg.description_states and cfg.text_model is None:
        raise ValueError("features.description_states needs features.text_model (the frozen encoder to run)")


def link_visual(visual: ReadView, dest: Path) -> None:
    """Hard-link the visual artifact's files into `visual/` (copy across filesystems)."""
    dest.mkdir(parents=True, exist_ok=True)
    for file in visual.parts() + [visual.file("errors.parquet")]:
        target = dest / file.name
        if target.exists():
            continue
        tmp = dest / f".{file.name}.link-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        try:
            os.link(file, tmp)
        except OSError:
            shutil.copyfile(file, tmp)
        os.replace(tmp, target)


# ------------------------------------------------------------------------------------------- text
TEXT_WORK = ("item_id", "caption_id", "split", "lang", "text", "kind", "source")


def caption_work(captions: pa.Table, translations: pa.Table, items: list[dict]) -> TableRows:
    """Every caption to tokenise, sorted by (item, caption, language, kind, source); translate-artifact MT
    replaces shipped MT. Built and kept in Arrow (leccr.core.rows): 20 captions per item at Multi30K's
    size would be 608k Python dicts for the whole stage."""

    def key(table: pa.Table) -> pa.Array:
        return pc.binary_join_element_wise(table.column("caption_id"), table.column("lang"), "\x1f")

    shipped = captions.filter(
        pc.invert(pc.and_(pc.equal(captions.column("kind"), "mt"), pc.is_in(key(captions), key(translations))))
    )
    shipped = shipped.append_column("source", pa.array(["dataset"] * shipped.num_rows, pa.string()))
    # A translation's split is its English caption's, else its item's; an item the dataset artifact
    # no longer has is left out (it cannot happen with matching keys).
    english = captions.filter(pc.equal(captions.column("lang"), "en"))
    item_ids = pa.array([item["item_id"] for item in items], pa.string())
    item_splits = pa.array([item["split"] for item in items], pa.string())
    by_caption = pc.take(
        english.column("split"), pc.index_in(translations.column("caption_id"), value_set=english.column("caption_id"))
    )
    by_item = pc.take(item_splits, pc.index_in(translations.column("item_id"), value_set=item_ids))
    translated = translations.select(["item_id", "caption_id", "lang", "text"]).append_column(
        "split", pc.coalesce(by_caption, by_item)
    )
    translated = translated.filter(pc.is_valid(translated.column("split")))
    translated = translated.append_column("kind", pa.array(["mt"] * translated.num_rows, pa.string()))
    translated = translated.append_column("source", pa.array(["translate"] * translated.num_rows, pa.string()))
    plain = pa.schema([(name, pa.string()) for name in TEXT_WORK])  # nullable both: the two differ there
    work = pa.concat_tables([shipped.select(TEXT_WORK).cast(plain), translated.select(TEXT_WORK).cast(plain)])
    order = [(name, "ascending") for name in ("item_id", "caption_id", "lang", "kind", "source")]
    return TableRows(work.sort_by(order))


def _text_processor(cfg: FeaturesConfig, tokenizer: Lazy):
    from leccr.features.text import tokenize

    def process(shard: list[dict], index: int) -> ShardResult:
        errors = [
            (r["item_id"], f"caption {r['caption_id']} ({r['lang']}, {r['kind']}): empty text")
            for r in shard
            if not r["text"].strip()
        ]
        rows = [r for r in shard if r["text"].strip()]
        ids = tokenize(tokenizer.get(), [r["text"] for r in rows], cfg.max_length)
        table = pa.table(
            {
                **{
                    name: pa.array([r[name] for r in rows], pa.string())
                    for name in ("item_id", "caption_id", "split", "lang", "kind", "source")
                },
                "n_tokens": pa.array([len(x) for x in ids], pa.int32()),
                "input_ids": ids_column(ids),
            }
        )
        return ShardResult(table, errors, {"tokens": float(sum(len(x) for x in ids))})

    return process


# ------------------------------------------------------------------------------------------- descriptions
def description_work(descriptions: pa.Table, items: list[dict], views: list[str] | None, join: str) -> list[dict]:
    """One entry per item with at least one usable description: its view ids and texts, in order."""
    by_item: dict[str, dict[str, str]] = defaultdict(dict)
    for row in descriptions.select(["item_id", "view_id", "description"]).to_pylist():
        if row["description"].strip():
            by_item[row["item_id"]][row["view_id"]] = row["description"].strip()
    work = []
    for item in items:
        available = by_item.get(item["item_id"])
        if not available:
            continue
        order = [v for v in views if v in available] if views is not None else sorted(available)
        if not order:
            continue
        if join == "first":
            order = order[:1]
        work.append(
            {"item_id": item["item_id"], "split": item["split"], "views": order, "texts": [available[v] for v in order]}
        )
    return work


def _description_table(
    rows: list[dict], ids: list[list[int]], states: list[np.ndarray] | None, cfg: FeaturesConfig
) -> pa.Table:
    columns = {
        "item_id": pa.array([r["item_id"] for r in rows], pa.string()),
        "split": pa.array([r["split"] for r in rows], pa.string()),
        "views": pa.array([r["views"] for r in rows], pa.list_(pa.string())),
        "n_tokens": pa.array([len(x) for x in ids], pa.int32()),
        "input_ids": ids_column(ids),
    }
    if states is not None:
        columns["dim"] = pa.array([s.shape[1] for s in states], pa.int32())
        columns["states"] = float_list_column(states, cfg.states_dtype)
    return pa.table(columns)


def _encode_states(encoder: Lazy, ids: list[list[int]], batch_size: int) -> list[np.ndarray]:
    # Sort by length so each batch pads little; results go back in input order.
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[np.ndarray | None] = [None] * len(ids)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        for index, state in zip(batch, encoder.get().encode([ids[i] for i in batch])):
            out[index] = state
    return [state for state in out if state is not None]  # every position was filled


def _description_processor(cfg: FeaturesConfig, tokenizer: Lazy, encoder: Lazy | None):
    from leccr.features.text import join_views, tokenize

    def process(shard: list[dict], index: int) -> ShardResult:
        texts = [join_views(tokenizer.get(), r["texts"], cfg.description_join) for r in shard]
        ids = tokenize(tokenizer.get(), texts, cfg.max_length)
        states = _encode_states(encoder, ids, cfg.batch_size) if encoder is not None else None
        return ShardResult(_description_table(shard, ids, states, cfg), [], {"tokens": float(sum(len(x) for x in ids))})

    return process


# ------------------------------------------------------------------------------------------- run
# A caption's token ids depend on its row alone; a description's on its item, split, views and texts.
TEXT_INPUT = ("item_id", "caption_id", "split", "lang", "text", "kind", "source")
TEXT_UNIT = ("item_id", "caption_id", "lang", "kind", "source")
DESCRIPTION_INPUT = ("item_id", "split", "views", "texts")


def _inputs(ctx: StageContext[FeaturesConfig]) -> tuple[list[dict], pa.Table, pa.Table, pa.Table]:
    items = sorted(
        read_table(ctx.upstream("dataset").file("items.parquet"), ITEMS).to_pylist(), key=lambda item: item["item_id"]
    )
    captions = read_table(ctx.upstream("dataset").file("captions.parquet"), CAPTIONS)
    translations = (
        ctx.upstream("translate").read(TRANSLATIONS, columns=["item_id", "caption_id", "lang", "text"])
        if ctx.upstream("translate").parts()
        else TRANSLATIONS.empty_table()
    )
    descriptions = (
        ctx.upstream("describe").read(DESCRIPTIONS, columns=["item_id", "view_id", "description"])
        if ctx.upstream("describe").parts()
        else DESCRIPTIONS.empty_table()
    )
    return items, captions, translations, descriptions


def shard_jobs(ctx: StageContext[FeaturesConfig]) -> list[ShardJob]:
    """The text side's two tables: one row per caption, one per described item."""
    return _jobs(ctx.section, *_inputs(ctx))


def _jobs(
    cfg: FeaturesConfig, items: list[dict], captions: pa.Table, translations: pa.Table, descriptions: pa.Table
) -> list[ShardJob]:
    desc_schema = description_schema(cfg.states_dtype if cfg.description_states else None)
    return [
        ShardJob(
            caption_work(captions, translations, items),
            cfg.text_shard_size,
            TEXT_TOKENS,
            item_id=lambda r: r["item_id"],
            unit_columns=TEXT_UNIT,
            input_fields=TEXT_INPUT,
            subdir="text",
            max_error_rate=cfg.max_error_rate,
            unit="captions",
            row_group_size=65536,
        ),
        ShardJob(
            description_work(descriptions, items, cfg.description_views, cfg.description_join),
            cfg.shard_size,
            desc_schema,
            item_id=lambda r: r["item_id"],
            input_fields=DESCRIPTION_INPUT,
            subdir="descriptions",
            max_error_rate=cfg.max_error_rate,
            unit="descriptions",
            background_write=cfg.description_states,
        ),  # states: float arrays, slow to encode
    ]


def run(ctx: StageContext[FeaturesConfig]) -> None:
    # torch and transformers: imported when the stage runs, not when a run is planned
    from leccr.features.text import TextStateEncoder, load_tokenizer, tokenize

    cfg = ctx.section
    check_config(cfg)
    started = time.perf_counter()
    items, captions, translations, descriptions = _inputs(ctx)

    if ctx.shard_slot is None:
        link_visual(ctx.upstream("visual"), ctx.out_dir / "visual")

    tokenizer_path = str(cfg.tokenizer or cfg.text_model)  # one of them is set (check_config)
    tokenizer = Lazy(lambda: load_tokenizer(tokenizer_path))
    text_job, desc_job = _jobs(cfg, items, captions, translations, descriptions)
    text_totals = ctx.run_shards(replace(text_job, process=_text_processor(cfg, tokenizer)))

    device, precision = cfg.device, cfg.precision
    encoder = (
        Lazy(lambda: TextStateEncoder(str(cfg.text_model), tokenizer.get().pad_token_id, device, precision))
        if cfg.description_states
        else None
    )
    desc_schema = desc_job.schema
    desc_work = desc_job.work
    desc_totals = ctx.run_shards(replace(desc_job, process=_description_processor(cfg, tokenizer, encoder)))
    if ctx.shard_slot is not None:
        return  # the finalising run writes the shared files

    # The encoding of an empty description, for readers that fill in items without one.
    empty_ids = tokenize(tokenizer.get(), [""], cfg.max_length)
    empty_states = _encode_states(encoder, empty_ids, 1) if encoder is not None else None
    write_table(
        _description_table([{"item_id": "", "split": "", "views": []}], empty_ids, empty_states, cfg),
        ctx.out_dir / "descriptions" / EMPTY_DESCRIPTION_FILE,
        desc_schema,
    )

    loaded = tokenizer.get()
    visual = ctx.upstream("visual").manifest
    visual_facts = {
        "visual_key": ctx.upstream("visual").key,
        "visual_rows": visual.summary.get("rows"),
        "visual_errors": visual.summary.get("errors"),
    }
    # The vision tower is the visual artifact's (`visual_key`, whose manifest names it): not this stage's key.
    models = {"tokenizer": ctx.keyed("tokenizer" if cfg.tokenizer is not None else "text_model")}
    info = {
        "layout_version": 1,
        # What made the features: each model's content digest, and its name (in this stage's key, so
        # the file agrees with it, but volatile: a renamed model folder rewrites this file and changes
        # nothing downstream, whose inputs are the same bytes).
        "model_digests": {role: identity["content"] for role, identity in models.items()},
        "model_names": {role: identity["name"] for role, identity in models.items()},
        "volatile": ["model_names"],
        "pad_token_id": loaded.pad_token_id,
        "cls_token_id": loaded.cls_token_id,
        "sep_token_id": loaded.sep_token_id,
        "max_length": cfg.max_length,
        "visual": {
            "visual_key": ctx.upstream("visual").key,
            "visual_fixed": visual.summary.get("fixed"),
            "visual_dim": visual.summary.get("dim"),
            "visual_n_tokens": visual.summary.get("n_tokens"),
            "source": visual.config["visual_source"],
            "output": visual.config["visual_output"],
            "dtype": visual.config["visual_dtype"],
        },
        "descriptions": {
            "join": cfg.description_join,
            "views": cfg.description_views,
            "states": cfg.description_states,
            "states_dtype": cfg.states_dtype if cfg.description_states else None,
        },
    }
    atomic_write_text(ctx.out_dir / INFO_FILE, json.dumps(info, indent=2, sort_keys=True) + "\n")
    described = {r["item_id"] for r in desc_work}
    ctx.summary.update(
        **visual_facts,
        items=len(items),
        captions=text_totals.rows,
        caption_errors=text_totals.errors,
        caption_tokens=int(text_totals.stats.get("tokens", 0)),
        descriptions=desc_totals.rows,
        items_without_description=sum(1 for item in items if item["item_id"] not in described),
        seconds=round(time.perf_counter() - started, 3),
    )
    ctx.log.info(
        "features: %s visual rows (visual %s), %d captions, %d descriptions (%d items without)",
        visual_facts["visual_rows"],
        visual_facts["visual_key"],
        text_totals.rows,
        desc_totals.rows,
        ctx.summary["items_without_description"],
    )


def key_config(cfg: ExperimentConfig, fingerprints) -> dict:
    """What `device`/`precision: auto` mean where the description encoder runs, when it runs."""
    if not cfg.features.description_states:
        return {}
    from leccr.runtime.device import resolved_numerics

    return {"numerics": resolved_numerics(cfg, "features", cfg.features.device, cfg.features.precision)}


STAGE = StageDef(
    name="features",
    upstream=("dataset", "translate", "describe", "visual"),
    reads={"dataset": ("items.parquet", "captions.parquet"), "translate": ("*",), "describe": ("*",), "visual": ("*",)},
    section=section,
    run=run,
    sharded=True,
    key_config=key_config,
    shard_jobs=shard_jobs,
    # no row names a model (features_info.json does), and shard sizes only group the rows
    memo_excludes=("tokenizer.name", "text_model.name", "shard_size", "text_shard_size"),
)
