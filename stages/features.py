"""features: visual features, caption tokens and description tokens (+ frozen states), cached as Parquet.

Three sub-tables of one artifact (layouts in schemas/features.py):

    visual/        one row per visual item: [n_tokens, dim] from a vision tower, or imported arrays
    text/          one row per caption (English, human target-language, machine translations): token ids
    descriptions/  one row per described item: token ids of its description view(s) [+ encoder states]

Why a second cache level for `visual/`: the stage key hashes the whole `features` section, so a new
tokenizer or max_length gives a new features artifact — but the visual features do not depend on
them, and they are the expensive part (a vision tower over every image or frame). So the visual
shards are computed into their own content-addressed folder,

    <artifacts root>/features-visual/<visual key>/part-*.parquet, errors.parquet, _manifest.json

keyed only by the visual fields of the section (`FeaturesConfig.VISUAL_FIELDS`) and the dataset key,
and hard-linked into `features/<key>/visual/` (copied where the filesystem cannot link). Shards and
files are immutable once committed, so sharing them is safe; a features artifact stays a complete,
self-contained folder (DuckDB and the readers see plain files). The visual folder has its own
resumable shards and its own manifest, written last; a complete one is reused by every features
artifact with the same visual settings.

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
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from leccr.config import ContentPath, ExperimentConfig, FeaturesConfig, Section
from leccr.features.storage import fixed_list_column, float_list_column, ids_column, rows_per_group
from leccr.features.text import TextStateEncoder, join_views, load_tokenizer, tokenize
from leccr.features.vision import FeatureError, ImportedFeatures, VisionEncoder
from leccr.store import (MANIFEST, ItemError, ShardResult, StageContext, atomic_write_text, compute_key, part_name,
                         reopen_for_retry, write_manifest)
from schemas.core import read_table, write_table
from schemas.dataset import CAPTIONS, ITEMS
from schemas.describe import DESCRIPTIONS
from schemas.features import TEXT_TOKENS, description_schema, visual_schema
from schemas.translate import TRANSLATIONS

NAME = "features"
STAGE_VERSION = "1"
UPSTREAM = ("dataset", "translate", "describe")
SHARDED = True

VISUAL_STAGE = "features-visual"  # the shared visual cache: <root>/features-visual/<visual key>/
VISUAL_VERSION = "1"  # bump when visual features change for the same visual settings
INFO_FILE = "features_info.json"
EMPTY_DESCRIPTION_FILE = "empty.parquet"


def section(cfg: ExperimentConfig) -> FeaturesConfig:
    return cfg.features


class VisualSettings(Section):
    """The fields of FeaturesConfig that shape the visual features: the visual cache key hashes these."""

    visual_source: str
    vision_model: ContentPath | None
    visual_output: str
    image_size: int | None
    num_frames: int | None
    fps: float | None
    precision: str
    visual_dtype: str
    import_path: ContentPath | None
    shard_size: int


def visual_settings(cfg: FeaturesConfig) -> VisualSettings:
    return VisualSettings(**{name: getattr(cfg, name) for name in FeaturesConfig.VISUAL_FIELDS})


def visual_key(cfg: FeaturesConfig, dataset_key: str) -> str:
    return compute_key(VISUAL_STAGE, VISUAL_VERSION, visual_settings(cfg), {"dataset": dataset_key})


def visual_cache_dir(ctx: StageContext) -> Path:
    """<root>/features-visual/<key>: beside the stage folders (ctx.out_dir is <root>/features/<key>)."""
    return ctx.out_dir.parent.parent / VISUAL_STAGE / visual_key(ctx.section, ctx.inputs["dataset"].key)


def discard_caches(cfg: ExperimentConfig, inputs: dict) -> None:
    """The pipeline's --force hook: a forced features stage recomputes its visual features too."""
    discard_visual_cache(cfg.artifacts_root, cfg.features, inputs["dataset"].key)


def discard_visual_cache(store_root: str | Path, cfg: FeaturesConfig, dataset_key: str) -> Path | None:
    """For `--force features`: remove the shared visual folder this config would reuse (renamed away
    first, so no reader sees it half-deleted). Returns the removed path, or None when there was none.
    Features artifacts that already link its files keep their own links."""
    folder = Path(store_root) / VISUAL_STAGE / visual_key(cfg, dataset_key)
    if not folder.exists():
        return None
    trash = folder.with_name(f".trash-{folder.name}-{os.getpid()}-{time.time_ns()}")
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)
    return folder


def check_config(cfg: FeaturesConfig) -> None:
    if cfg.visual_source == "model" and cfg.vision_model is None:
        raise ValueError("features.vision_model is required for visual_source 'model' (a vision tower folder)")
    if cfg.tokenizer is None and cfg.text_model is None:
        raise ValueError("features.text_model (or features.tokenizer) is required: captions are tokenised with it")
    if cfg.description_states and cfg.text_model is None:
        raise ValueError("features.description_states needs features.text_model (the frozen encoder to run)")


class _Lazy:
    """Builds an engine on first use: a run whose shards are all committed never loads a model."""

    def __init__(self, factory):
        self.factory, self.value = factory, None

    def get(self):
        if self.value is None:
            self.value = self.factory()
        return self.value


# ------------------------------------------------------------------------------------------- visual
def _visual_layout(cfg: FeaturesConfig, items: list[dict], encoder: _Lazy, cache_dir: Path) -> tuple[pa.Schema, int | None]:
    """The visual schema (fixed or variable size) and the tokens per item when fixed.

    Fixed when every item's shape is known up front: model features of images, and of videos sampled
    to a fixed `num_frames` (no fps). Imported arrays may vary, so they use the variable layout.
    """
    committed = sorted(cache_dir.glob("part-*.parquet"))
    if committed:  # a resumed or finalising run: the shape is in the committed shards, no model needed
        schema = pq.read_schema(committed[0])
        features = schema.field("features").type
        first = pq.read_table(committed[0], columns=["n_tokens"]).column("n_tokens")
        per_item = int(first[0].as_py()) if pa.types.is_fixed_size_list(features) and len(first) else None
        return visual_schema(cfg.visual_dtype, features.list_size if per_item else None), per_item
    if cfg.visual_source == "import":
        return visual_schema(cfg.visual_dtype, None), None
    media = {item["media_type"] for item in items}
    if not media or (("video" in media) and cfg.fps is not None) or len(media) > 1:
        return visual_schema(cfg.visual_dtype, None), None
    from PIL import Image

    side = cfg.image_size or 224  # the processor resizes to its own size: any probe size will do
    tokens_per_image, dim = encoder.get().encode([Image.new("RGB", (side, side))]).shape[1:]
    per_item = tokens_per_image * (cfg.num_frames if media == {"video"} else 1)
    return visual_schema(cfg.visual_dtype, per_item * dim), per_item


def _visual_rows(rows: list[dict], arrays: list[np.ndarray], schema: pa.Schema, dtype: str) -> pa.Table:
    features_type = schema.field("features").type
    if not arrays:
        features = pa.array([], type=features_type)
    elif pa.types.is_fixed_size_list(features_type):
        features = fixed_list_column(arrays, dtype)
    else:
        features = float_list_column(arrays, dtype)
    return pa.table({
        "item_id": pa.array([r["item_id"] for r in rows], pa.string()),
        "split": pa.array([r["split"] for r in rows], pa.string()),
        "media_type": pa.array([r["media_type"] for r in rows], pa.string()),
        "n_tokens": pa.array([a.shape[0] for a in arrays], pa.int32()),
        "dim": pa.array([a.shape[1] for a in arrays], pa.int32()),
        "features": features,
    })


def _model_processor(ctx: StageContext, cfg: FeaturesConfig, shards: list[list[dict]], encoder: _Lazy,
                     schema: pa.Schema, per_item: int | None, cache_dir: Path):
    from leccr.media import MediaError, ShardPrefetcher, load_visual

    def load(item: dict):
        return load_visual(ctx.media_path(item["path"]), item["media_type"], cfg.num_frames, cfg.fps)

    step = ctx.shard_slot[1] if ctx.shard_slot is not None else 1

    def next_index(index: int) -> int | None:  # the next shard this process will compute: prefetch it
        candidate = index + step
        while candidate < len(shards) and (cache_dir / part_name(candidate)).exists():
            candidate += step
        return candidate if candidate < len(shards) else None

    prefetcher = ShardPrefetcher(shards, load, workers=cfg.decode_workers, next_index=next_index)

    def process(shard: list[dict], index: int) -> ShardResult:
        errors, loaded = [], []
        for item, frames in prefetcher.take(index, shard):
            if isinstance(frames, MediaError):  # the file may be fixed or mounted again: a rerun retries it
                errors.append(ItemError(item["item_id"], f"{item['media_type']} {frames.path}: {frames.reason}",
                                        retryable=True, file=item["path"]))
            else:
                loaded.append((item, frames))
        frames_flat = [frame for _, frames in loaded for frame in frames]
        started = time.perf_counter()
        outputs = [encoder.get().encode(frames_flat[i : i + cfg.batch_size])
                   for i in range(0, len(frames_flat), cfg.batch_size)]
        seconds = time.perf_counter() - started
        states = np.concatenate(outputs) if outputs else np.zeros((0, 1, 1), np.float32)
        rows, arrays, at = [], [], 0
        for item, frames in loaded:
            tokens = states[at : at + len(frames)]  # [frames, tokens, dim]: a video's frames in order
            at += len(frames)
            array = tokens.reshape(-1, tokens.shape[-1])
            if per_item is not None and array.shape[0] != per_item:
                errors.append((item["item_id"], f"{array.shape[0]} visual tokens, the fixed layout holds {per_item}"))
                continue
            rows.append(item)
            arrays.append(array)
        return ShardResult(_visual_rows(rows, arrays, schema, cfg.visual_dtype), errors,
                           {"frames": float(len(frames_flat)), "encode_seconds": seconds})

    return process, prefetcher


def _import_processor(ctx: StageContext, cfg: FeaturesConfig, schema: pa.Schema):
    imported = _Lazy(lambda: ImportedFeatures(cfg.import_path))

    def process(shard: list[dict], index: int) -> ShardResult:
        rows, arrays, errors = [], [], []
        for item in shard:
            try:
                arrays.append(imported.get().get(item["item_id"], ctx.media_path(item["feature_path"])))
                rows.append(item)
            except FeatureError as error:
                errors.append((item["item_id"], str(error)))
        return ShardResult(_visual_rows(rows, arrays, schema, cfg.visual_dtype), errors, {})

    return process


def _link_files(source: Path, dest: Path) -> None:
    """Hard-link the committed visual files into the features artifact (copy across filesystems)."""
    dest.mkdir(parents=True, exist_ok=True)
    for file in sorted(source.glob("part-*.parquet")) + [source / "errors.parquet"]:
        target = dest / file.name
        if target.exists() and os.path.samefile(file, target):
            continue  # a shard retried in the cache is a new file: link that one
        tmp = dest / f".{file.name}.link-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        try:
            os.link(file, tmp)
        except OSError:
            shutil.copyfile(file, tmp)
        os.replace(tmp, target)


def run_visual(ctx: StageContext, items: list[dict]) -> dict:
    """Fill (or reuse) the visual cache folder, then link it into `visual/`; returns summary facts."""
    cfg: FeaturesConfig = ctx.section
    cache_dir = visual_cache_dir(ctx)
    facts = {"visual_key": cache_dir.name, "visual_cache_dir": str(cache_dir)}
    if (cache_dir / MANIFEST).is_file() and not reopen_for_retry(cache_dir, ctx.dataset_root, ctx.log, VISUAL_STAGE):
        facts["visual_cache"] = "reused"
    else:
        facts["visual_cache"] = "computed"
        cache_dir.mkdir(parents=True, exist_ok=True)
        device, precision = cfg.device, cfg.precision
        encoder = _Lazy(lambda: VisionEncoder(cfg.vision_model, cfg.visual_output, cfg.image_size, device, precision))
        schema, per_item = _visual_layout(cfg, items, encoder, cache_dir)
        features_type = schema.field("features").type
        bytes_per_row = (features_type.list_size * features_type.value_type.byte_width
                         if pa.types.is_fixed_size_list(features_type) else 64 * 2**10)
        vctx = StageContext(stage=VISUAL_STAGE, key=cache_dir.name, section=visual_settings(cfg),
                            inputs={"dataset": ctx.inputs["dataset"]}, out_dir=cache_dir, log=ctx.log,
                            shard_slot=ctx.shard_slot, dataset_root=ctx.dataset_root)
        prefetcher = None
        if cfg.visual_source == "import":
            process = _import_processor(ctx, cfg, schema)
        else:
            shards = [items[i : i + cfg.shard_size] for i in range(0, len(items), cfg.shard_size)]
            process, prefetcher = _model_processor(ctx, cfg, shards, encoder, schema, per_item, cache_dir)
        started = time.time()
        try:
            totals = vctx.run_shards(items, cfg.shard_size, process, schema, item_id=lambda item: item["item_id"],
                                     max_error_rate=cfg.max_error_rate, unit="items",
                                     row_group_size=rows_per_group(bytes_per_row))
        finally:
            if prefetcher is not None:
                prefetcher.close()
        encode_seconds = totals.stats.get("encode_seconds", 0.0)
        facts.update(visual_shards_done=totals.shards_done, visual_shards_resumed=totals.shards_resumed,
                     frames_encoded=int(totals.stats.get("frames", 0)),
                     frames_per_s=round(totals.stats["frames"] / encode_seconds, 1) if encode_seconds > 0 else None)
        if ctx.shard_slot is not None:
            return facts
        vctx.summary.update(items=len(items), rows=totals.rows, errors=totals.errors)
        write_manifest(vctx, VISUAL_VERSION, started, extra={})
    if ctx.shard_slot is None:
        _link_files(cache_dir, ctx.out_dir / "visual")
        first = pq.read_table(ctx.out_dir / "visual" / part_name(0), columns=["n_tokens", "dim"]) \
            if (ctx.out_dir / "visual" / part_name(0)).exists() else None
        schema = pq.read_schema(ctx.out_dir / "visual" / part_name(0)) if first is not None else None
        facts.update(
            visual_rows=sum(pq.ParquetFile(p).metadata.num_rows for p in (ctx.out_dir / "visual").glob("part-*.parquet")),
            visual_errors=pq.ParquetFile(ctx.out_dir / "visual" / "errors.parquet").metadata.num_rows,
            visual_fixed=bool(schema is not None and pa.types.is_fixed_size_list(schema.field("features").type)),
            visual_dim=int(first.column("dim")[0].as_py()) if first is not None and first.num_rows else None,
            visual_n_tokens=int(first.column("n_tokens")[0].as_py()) if first is not None and first.num_rows else None,
        )
    return facts


# ------------------------------------------------------------------------------------------- text
def caption_work(captions: pa.Table, translations: pa.Table, items: list[dict]) -> list[dict]:
    """Every caption to tokenise, in a stable order; translate-artifact MT replaces shipped MT."""
    split_of_item = {item["item_id"]: item["split"] for item in items}
    translated = {(row["caption_id"], row["lang"]) for row in translations.select(["caption_id", "lang"]).to_pylist()}
    split_of_caption = {}
    work = []
    for row in captions.to_pylist():
        if row["lang"] == "en":
            split_of_caption[row["caption_id"]] = row["split"]
        if row["kind"] == "mt" and (row["caption_id"], row["lang"]) in translated:
            continue
        work.append({**row, "source": "dataset"})
    for row in translations.select(["item_id", "caption_id", "lang", "text"]).to_pylist():
        split = split_of_caption.get(row["caption_id"], split_of_item.get(row["item_id"]))
        if split is None:
            continue  # an item the dataset artifact no longer has (cannot happen with matching keys)
        work.append({**row, "split": split, "kind": "mt", "source": "translate"})
    work.sort(key=lambda r: (r["item_id"], r["caption_id"], r["lang"], r["kind"], r["source"]))
    return work


def _text_processor(cfg: FeaturesConfig, tokenizer: _Lazy):
    def process(shard: list[dict], index: int) -> ShardResult:
        errors = [(r["item_id"], f"caption {r['caption_id']} ({r['lang']}, {r['kind']}): empty text")
                  for r in shard if not r["text"].strip()]
        rows = [r for r in shard if r["text"].strip()]
        ids = tokenize(tokenizer.get(), [r["text"] for r in rows], cfg.max_length)
        table = pa.table({
            **{name: pa.array([r[name] for r in rows], pa.string())
               for name in ("item_id", "caption_id", "split", "lang", "kind", "source")},
            "n_tokens": pa.array([len(x) for x in ids], pa.int32()),
            "input_ids": ids_column(ids),
        })
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
        work.append({"item_id": item["item_id"], "split": item["split"], "views": order,
                     "texts": [available[v] for v in order]})
    return work


def _description_table(rows: list[dict], ids: list[list[int]], states: list[np.ndarray] | None,
                       cfg: FeaturesConfig) -> pa.Table:
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


def _encode_states(encoder: _Lazy, ids: list[list[int]], batch_size: int) -> list[np.ndarray]:
    # Sort by length so each batch pads little; results go back in input order.
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[np.ndarray | None] = [None] * len(ids)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        for index, state in zip(batch, encoder.get().encode([ids[i] for i in batch])):
            out[index] = state
    return out


def _description_processor(cfg: FeaturesConfig, tokenizer: _Lazy, encoder: _Lazy | None):
    def process(shard: list[dict], index: int) -> ShardResult:
        texts = [join_views(tokenizer.get(), r["texts"], cfg.description_join) for r in shard]
        ids = tokenize(tokenizer.get(), texts, cfg.max_length)
        states = _encode_states(encoder, ids, cfg.batch_size) if encoder is not None else None
        return ShardResult(_description_table(shard, ids, states, cfg), [],
                           {"tokens": float(sum(len(x) for x in ids))})

    return process


# ------------------------------------------------------------------------------------------- run
def run(ctx: StageContext) -> None:
    cfg: FeaturesConfig = ctx.section
    check_config(cfg)
    started = time.perf_counter()
    items = sorted(read_table(ctx.inputs["dataset"].file("items.parquet"), ITEMS).to_pylist(),
                   key=lambda item: item["item_id"])
    captions = read_table(ctx.inputs["dataset"].file("captions.parquet"), CAPTIONS)
    translations = ctx.inputs["translate"].read(TRANSLATIONS, columns=["item_id", "caption_id", "lang", "text"]) \
        if ctx.inputs["translate"].parts() else TRANSLATIONS.empty_table()
    descriptions = ctx.inputs["describe"].read(DESCRIPTIONS, columns=["item_id", "view_id", "description"]) \
        if ctx.inputs["describe"].parts() else DESCRIPTIONS.empty_table()

    visual_facts = run_visual(ctx, items)

    tokenizer_path = cfg.tokenizer or cfg.text_model
    tokenizer = _Lazy(lambda: load_tokenizer(tokenizer_path))
    captions_work = caption_work(captions, translations, items)
    text_totals = ctx.run_shards(captions_work, cfg.text_shard_size, _text_processor(cfg, tokenizer), TEXT_TOKENS,
                                 item_id=lambda r: r["item_id"], subdir="text", max_error_rate=cfg.max_error_rate,
                                 unit="captions", row_group_size=65536)

    device, precision = cfg.device, cfg.precision
    encoder = (_Lazy(lambda: TextStateEncoder(cfg.text_model, tokenizer.get().pad_token_id, device, precision))
               if cfg.description_states else None)
    desc_schema = description_schema(cfg.states_dtype if cfg.description_states else None)
    desc_work = description_work(descriptions, items, cfg.description_views, cfg.description_join)
    desc_totals = ctx.run_shards(desc_work, cfg.shard_size, _description_processor(cfg, tokenizer, encoder),
                                 desc_schema, item_id=lambda r: r["item_id"], subdir="descriptions",
                                 max_error_rate=cfg.max_error_rate, unit="descriptions")
    if ctx.shard_slot is not None:
        return  # the finalising run writes the shared files

    # The encoding of an empty description, for readers that fill in items without one.
    empty_ids = tokenize(tokenizer.get(), [""], cfg.max_length)
    empty_states = _encode_states(encoder, empty_ids, 1) if encoder is not None else None
    write_table(_description_table([{"item_id": "", "split": "", "views": []}], empty_ids, empty_states, cfg),
                ctx.out_dir / "descriptions" / EMPTY_DESCRIPTION_FILE, desc_schema)

    loaded = tokenizer.get()
    info = {
        "layout_version": 1,
        "tokenizer": Path(tokenizer_path).name,
        "pad_token_id": loaded.pad_token_id,
        "cls_token_id": loaded.cls_token_id,
        "sep_token_id": loaded.sep_token_id,
        "max_length": cfg.max_length,
        "visual": {key: visual_facts.get(key) for key in ("visual_key", "visual_fixed", "visual_dim", "visual_n_tokens")}
        | {"source": cfg.visual_source, "output": cfg.visual_output, "dtype": cfg.visual_dtype,
           "model": Path(cfg.vision_model).name if cfg.vision_model else None},
        "descriptions": {"join": cfg.description_join, "views": cfg.description_views,
                         "states": cfg.description_states,
                         "states_dtype": cfg.states_dtype if cfg.description_states else None},
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
    ctx.log.info("features: %s visual rows (%s, cache %s), %d captions, %d descriptions (%d items without)",
                 visual_facts.get("visual_rows"), visual_facts["visual_key"], visual_facts["visual_cache"],
                 text_totals.rows, desc_totals.rows, ctx.summary["items_without_description"])
