"""visual: the visual features of every item — a vision tower's tokens (or pooled vectors), or imported arrays.

A stage of its own, upstream of `features`, because the visual features are the expensive part of
featurising (a vision tower over every image or frame) and depend on a few fields only: those of
`features` named in `FeaturesConfig.VISUAL_FIELDS` (see `leccr.config.VisualConfig`). A change of the
text side (tokenizer, max_length, descriptions) gives a new features artifact over the same visual
artifact, which `features` hard-links into its own `visual/` folder.

    <artifacts root>/visual/<key>/part-*.parquet, errors.parquet, _manifest.json

One row per item: [n_tokens, dim] features, fixed-size when every item's shape is known up front
(images; videos sampled to a fixed `num_frames`), variable otherwise (schemas/features.py).
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from leccr.config import ExperimentConfig, VisualConfig
from leccr.core.context import StageContext
from leccr.core.failures import ItemError
from leccr.core.shards import ShardJob, ShardResult
from leccr.core.stage import StageDef
from leccr.engines.cache import Lazy
from leccr.features.storage import fixed_list_column, float_list_column, rows_per_group
from leccr.media.paths import resolve_media_path
from leccr.schemas.core import read_table
from leccr.schemas.dataset import ITEMS
from leccr.schemas.features import visual_schema, visual_shape


def section(cfg: ExperimentConfig) -> VisualConfig:
    return VisualConfig.of(cfg.features)


def check_config(cfg: VisualConfig) -> None:
    if cfg.visual_source == "model" and cfg.vision_model is None:
        raise ValueError("features.vision_model is required for visual_source 'model' (a vision tower folder)")


def layout_kind(cfg: VisualConfig, items: list[dict]) -> str:
    """ "fixed" when every item's shape is known up front (model features of images only, or of videos
    sampled to a fixed `num_frames`), else "variable": how an item's row is stored, known without a model."""
    media = {item["media_type"] for item in items}
    if cfg.visual_source == "import" or not media or len(media) > 1 or ("video" in media and cfg.fps is not None):
        return "variable"
    return "fixed"


def _layout(cfg: VisualConfig, items: list[dict], encoder: Lazy, out_dir) -> tuple[pa.Schema, tuple[int, int] | None]:
    """The visual schema (fixed or variable size) and, when fixed, every item's (n_tokens, dim).

    Fixed when every item's shape is known up front: model features of images, and of videos sampled
    to a fixed `num_frames` (no fps). Imported arrays may vary, so they use the variable layout.
    """
    committed = sorted(out_dir.glob("part-*.parquet"))
    if committed:  # a resumed or finalising run: the layout is in any committed shard's schema, no model
        schema = pq.read_schema(committed[0])  # needed (a shard whose items all failed has it too)
        if not pa.types.is_fixed_size_list(schema.field("features").type):
            return visual_schema(cfg.visual_dtype, None), None
        fixed_shape = visual_shape(schema)
        assert fixed_shape is not None  # a fixed-size list column has one
        return visual_schema(cfg.visual_dtype, fixed_shape[0] * fixed_shape[1], fixed_shape), fixed_shape
    if layout_kind(cfg, items) == "variable":
        return visual_schema(cfg.visual_dtype, None), None
    media = {item["media_type"] for item in items}
    from PIL import Image

    side = cfg.image_size or 224  # the processor resizes to its own size: any probe size will do
    tokens_per_image, dim = encoder.get().encode([Image.new("RGB", (side, side))]).shape[1:]
    shape = (tokens_per_image * (cfg.num_frames if media == {"video"} else 1), dim)
    return visual_schema(cfg.visual_dtype, shape[0] * shape[1], shape), shape


def _row_shape(out_dir, shape: tuple[int, int] | None) -> tuple[int | None, int | None]:
    """(n_tokens, dim) for the summary, which `features` and `train` take the width from. Fixed layout:
    the schema's. Variable: the width every row of every shard shares (None when rows differ or there
    are none) and the token count when all rows have the same one."""
    if shape is not None:
        return shape
    columns = [pq.read_table(path, columns=["n_tokens", "dim"]) for path in sorted(out_dir.glob("part-*.parquet"))]
    dims = {d for table in columns for d in table.column("dim").to_pylist()}
    n_tokens = {n for table in columns for n in table.column("n_tokens").to_pylist()}
    return (n_tokens.pop() if len(n_tokens) == 1 else None), (dims.pop() if len(dims) == 1 else None)


def _rows(rows: list[dict], arrays: list[np.ndarray], schema: pa.Schema, dtype: str) -> pa.Table:
    features_type = schema.field("features").type
    if not arrays:
        features = pa.array([], type=features_type)
    elif pa.types.is_fixed_size_list(features_type):
        features = fixed_list_column(arrays, dtype)
    else:
        features = float_list_column(arrays, dtype)
    return pa.table(
        {
            "item_id": pa.array([r["item_id"] for r in rows], pa.string()),
            "split": pa.array([r["split"] for r in rows], pa.string()),
            "media_type": pa.array([r["media_type"] for r in rows], pa.string()),
            "n_tokens": pa.array([a.shape[0] for a in arrays], pa.int32()),
            "dim": pa.array([a.shape[1] for a in arrays], pa.int32()),
            "features": features,
        }
    )


def _model_processor(
    ctx: StageContext[VisualConfig],
    cfg: VisualConfig,
    shards: list[list[dict]],
    encoder: Lazy,
    schema: pa.Schema,
    shape: tuple[int, int] | None,
):
    from leccr.media.decode import ItemLoader, MediaError, ShardPrefetcher

    load = ItemLoader(ctx.dataset_root, cfg.num_frames, cfg.fps)
    prefetcher = ShardPrefetcher(shards, load, workers=cfg.decode_workers, next_index=ctx.next_shard(len(shards)))

    def process(shard: list[dict], index: int) -> ShardResult:
        errors: list[ItemError | tuple[str, str]] = []
        loaded: list[tuple[dict, list]] = []
        for item, frames in prefetcher.take(index, shard):
            if isinstance(frames, MediaError):
                errors.append(frames.item_error(item))
            else:
                loaded.append((item, frames))
        frames_flat = [frame for _, item_frames in loaded for frame in item_frames]
        started = time.perf_counter()
        outputs = [
            encoder.get().encode(frames_flat[i : i + cfg.batch_size])
            for i in range(0, len(frames_flat), cfg.batch_size)
        ]
        seconds = time.perf_counter() - started
        states = np.concatenate(outputs) if outputs else np.zeros((0, 1, 1), np.float32)
        rows, arrays, at = [], [], 0
        for item, item_frames in loaded:
            tokens = states[at : at + len(item_frames)]  # [frames, tokens, dim]: a video's frames in order
            at += len(item_frames)
            array = tokens.reshape(-1, tokens.shape[-1])
            if shape is not None and array.shape != shape:
                errors.append(
                    (item["item_id"], f"visual tokens of shape {array.shape}, the fixed layout holds {shape}")
                )
                continue
            rows.append(item)
            arrays.append(array)
        return ShardResult(
            _rows(rows, arrays, schema, cfg.visual_dtype),
            errors,
            {"frames": float(len(frames_flat)), "encode_seconds": seconds},
        )

    return process, prefetcher


def _import_processor(ctx: StageContext[VisualConfig], cfg: VisualConfig, schema: pa.Schema):
    from leccr.features.vision import FeatureError, ImportedFeatures

    imported = Lazy(lambda: ImportedFeatures(cfg.import_path))

    def process(shard: list[dict], index: int) -> ShardResult:
        rows, arrays, errors = [], [], []
        for item in shard:
            try:
                arrays.append(
                    imported.get().get(item["item_id"], resolve_media_path(ctx.dataset_root, item["feature_path"]))
                )
                rows.append(item)
            except FeatureError as error:
                errors.append((item["item_id"], str(error)))
        return ShardResult(_rows(rows, arrays, schema, cfg.visual_dtype), errors, {})

    return process


def work_items(ctx: StageContext[VisualConfig]) -> list[dict]:
    """Every item, sorted by id, with the layout its row is stored in (fixed-size or variable arrays)."""
    cfg = ctx.section
    items = sorted(
        read_table(ctx.upstream("dataset").file("items.parquet"), ITEMS).to_pylist(), key=lambda item: item["item_id"]
    )
    layout = layout_kind(cfg, items)
    return [{**item, "layout": layout} for item in items]


# An item's features depend on its media (or imported feature file) bytes, and its row names its split;
# its layout is how the row is stored (a quick run over images alone stores fixed-size arrays, a run
# that adds videos variable ones: their rows cannot be shared).
INPUT_FIELDS = ("item_id", "split", "media_type", "media_digest", "feature_digest", "layout")


def shard_jobs(ctx: StageContext[VisualConfig]) -> list[ShardJob]:
    cfg = ctx.section
    return [
        ShardJob(
            work_items(ctx),
            cfg.shard_size,
            visual_schema(cfg.visual_dtype, None),
            item_id=lambda item: item["item_id"],
            input_fields=INPUT_FIELDS,
            unit="items",
            schema_final=False,
        )
    ]  # a fixed layout's shape needs the model: the dry run does not load it


def run(ctx: StageContext[VisualConfig]) -> None:
    import torch  # imported when the stage runs, not when planned

    from leccr.features.vision import VisionEncoder
    from leccr.media.image_processor import IMAGE_PROCESSOR_BACKEND
    from leccr.runtime.device import resolve_device
    from leccr.runtime.threads import numerics

    cfg = ctx.section
    check_config(cfg)
    items = work_items(ctx)
    vision_model = str(cfg.vision_model)  # unused when importing arrays; check_config required it otherwise
    encoder = Lazy(lambda: VisionEncoder(vision_model, cfg.visual_output, cfg.image_size, cfg.device, cfg.precision))
    schema, shape = _layout(cfg, items, encoder, ctx.out_dir)
    features_type = schema.field("features").type
    bytes_per_row = (
        features_type.list_size * features_type.value_type.byte_width
        if pa.types.is_fixed_size_list(features_type)
        else 64 * 2**10
    )
    job = ShardJob(
        items,
        cfg.shard_size,
        schema,
        item_id=lambda item: item["item_id"],
        input_fields=INPUT_FIELDS,
        max_error_rate=cfg.max_error_rate,
        unit="items",
        row_group_size=rows_per_group(bytes_per_row),
        background_write=True,
    )  # Parquet writes of float arrays hidden behind extraction
    prefetcher = None
    if cfg.visual_source == "import":
        process = _import_processor(ctx, cfg, schema)
    else:
        split = ctx.plan_shards(job)  # media is decoded only for the items to compute
        shards = [split.to_compute(i) for i in range(len(split.shards))]
        process, prefetcher = _model_processor(ctx, cfg, shards, encoder, schema, shape)
    try:
        totals = ctx.run_shards(replace(job, process=process))
    finally:
        if prefetcher is not None:
            prefetcher.close()
    if ctx.shard_slot is not None:
        return
    encode_seconds = totals.stats.get("encode_seconds", 0.0)
    n_tokens, dim = _row_shape(ctx.out_dir, shape)
    ctx.summary.update(
        items=len(items),
        rows=totals.rows,
        errors=totals.errors,
        shards_done=totals.shards_done,
        shards_resumed=totals.shards_resumed,
        frames_encoded=int(totals.stats.get("frames", 0)),
        frames_per_s=round(totals.stats["frames"] / encode_seconds, 1) if encode_seconds > 0 else None,
        fixed=bool(pa.types.is_fixed_size_list(features_type)),
        dim=dim,
        n_tokens=n_tokens,
        # what the features depend on besides the key: the image processor's backend is fixed (PIL), the
        # torch build, CPU kernels and threads are this machine's (the demo's tower gave the same bytes on
        # 1 and 2 threads: its forward pass has no full reduction)
        numerics={
            **numerics(resolve_device(cfg.device).type, torch.get_num_threads()),
            "image_processor_backend": IMAGE_PROCESSOR_BACKEND,
        }
        if cfg.visual_source == "model"
        else None,
    )


def key_config(cfg: ExperimentConfig, fingerprints) -> dict:
    """What `device`/`precision: auto` mean where the vision tower runs (bf16 on a GPU, fp32 on a CPU)."""
    if cfg.features.visual_source != "model":
        return {}
    from leccr.runtime.device import resolved_numerics

    return {"numerics": resolved_numerics(cfg, "visual", cfg.features.device, cfg.features.precision)}


STAGE = StageDef(
    name="visual",
    upstream=("dataset",),
    reads={"dataset": ("items.parquet",)},
    section=section,
    run=run,
    sharded=True,
    key_config=key_config,
    shard_jobs=shard_jobs,
    config_section="features",
    memo_excludes=("shard_size",),
)
