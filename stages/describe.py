"""describe: one MLLM description of every visual item per view (prompt) — LECCR's semantic slots
are learnt from these.

Items come from the dataset artifact (sorted by item_id, so shards are stable across runs). Each
shard's media is decoded in background threads while the previous shard is being generated
(`leccr.media.decode.ShardPrefetcher`); unreadable, empty or missing media go to `errors.parquet` with the
reason and the stage carries on. All views of all items of a shard go to the engine in one call:
vLLM schedules them together; transformers splits them into `batch_size` batches.

Engines (`describe.engine`): `vllm`, `transformers` (see leccr.engines.mllm), or `import` for
descriptions made elsewhere — VideoChat2, the MLLM of the LECCR paper, is not served by vLLM: run
it with its own code, save `{item_id: description}` or `{item_id: {view_id: description}}` as JSON
(or `{"model": "what wrote them", "descriptions": {...}}`: rows then name that as their model), and
point `describe.import_path` at the file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from leccr.config import DescribeConfig, ExperimentConfig
from leccr.core.context import StageContext
from leccr.core.failures import ItemError
from leccr.core.shards import ShardJob, ShardResult
from leccr.core.stage import StageDef
from leccr.engines.mllm import (
    Generation,
    Request,
    RequestRejected,
    SamplingConfig,
    load_imported_descriptions,
    max_frames,
    request_seed,
)
from leccr.media.decode import ItemLoader, MediaError, ShardPrefetcher
from leccr.runtime.hub import ModelNotFound, model_path
from leccr.schemas.core import read_table
from leccr.schemas.dataset import ITEMS
from leccr.schemas.describe import DESCRIPTIONS


def section(cfg: ExperimentConfig) -> DescribeConfig:
    return cfg.describe


def check_config(cfg: DescribeConfig) -> None:
    """What the section cannot check alone (an experiment that never describes keeps the defaults)."""
    if cfg.engine in ("transformers", "vllm"):
        if cfg.model is None:
            raise ValueError(f"describe.model is required for engine {cfg.engine!r}: a model folder")
        try:
            model_path(cfg.model, "describe.model")  # a folder or a cached hub snapshot
        except ModelNotFound as error:
            raise ValueError(str(error)) from None
    if cfg.engine == "vllm":
        max_frames(cfg.num_frames, cfg.fps)
    if cfg.engine == "import" and cfg.import_path is None:
        raise ValueError("describe.import_path is required for engine 'import': a JSON file of item_id -> description")


def work_items(ctx: StageContext[DescribeConfig]) -> list[dict]:
    """The items to describe, sorted by item_id (stable shards), restricted to `splits` if set."""
    cfg = ctx.section
    items = read_table(ctx.upstream("dataset").file("items.parquet"), ITEMS)
    if cfg.splits is not None:
        items = items.filter(pc.is_in(items.column("split"), pa.array(cfg.splits)))
    rows = items.select(["item_id", "media_type", "path", "media_digest"]).to_pylist()
    return sorted(rows, key=lambda r: r["item_id"])


def views_for(cfg: DescribeConfig, media_type: str) -> dict[str, str]:
    return cfg.video_views if media_type == "video" else cfg.image_views


def description_work(ctx: StageContext[DescribeConfig]) -> list[dict]:
    """One unit per item and view (its prompt), grouped by item: a description depends on the item's
    media, its id (the sampling seed) and the view's prompt alone, so adding or editing one view, or
    adding a split, computes only the units it touches."""
    cfg = ctx.section
    return [
        {**item, "view_id": view_id, "prompt": prompt}
        for item in work_items(ctx)
        for view_id, prompt in views_for(cfg, item["media_type"]).items()
    ]


def sampling_of(cfg: DescribeConfig) -> SamplingConfig:
    return SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens, seed=cfg.seed)


def keyed_sampling(cfg: DescribeConfig) -> str:
    """The sampling settings rows record: only what the key counts (greedy decoding has no top_p or seed)."""
    settings = sampling_of(cfg).to_dict()
    if cfg.temperature == 0:
        settings = {"temperature": settings["temperature"], "max_tokens": settings["max_tokens"]}
    return json.dumps(settings, sort_keys=True)


def make_engine(cfg: DescribeConfig):
    """The generating engine of this section, loaded once per process (reused across shards)."""
    from leccr.engines.cache import cached_engine

    sampling = sampling_of(cfg)
    path = str(model_path(str(cfg.model), "describe.model"))  # set for a generating engine (check_config)
    if cfg.engine == "vllm":
        from leccr.engines.mllm import VllmMLLM

        settings = {
            "path": path,
            "sampling": sampling.to_json(),
            "frames": cfg.num_frames,
            "video_input": cfg.video_input,
            "tp": cfg.tensor_parallel_size,
            "mem": cfg.gpu_memory_utilization,
            "len": cfg.max_model_len,
            "dtype": cfg.dtype,
            "seqs": cfg.vllm_max_num_seqs,
            "options": cfg.vllm_options,
        }
        return cached_engine(
            "mllm-vllm",
            settings,
            lambda: VllmMLLM(
                path,
                sampling,
                max_images_per_prompt=max_frames(cfg.num_frames, cfg.fps),
                video_input=cfg.video_input,
                tensor_parallel_size=cfg.tensor_parallel_size,
                gpu_memory_utilization=cfg.gpu_memory_utilization,
                max_model_len=cfg.max_model_len,
                dtype=cfg.dtype,
                max_num_seqs=cfg.vllm_max_num_seqs,
                options=cfg.vllm_options,
            ),
        )
    from leccr.engines.mllm import TransformersMLLM

    settings = {
        "path": path,
        "sampling": sampling.to_json(),
        "device": cfg.device,
        "batch_size": cfg.batch_size,
        "dtype": cfg.dtype,
        "video_input": cfg.video_input,
    }
    return cached_engine(
        "mllm-transformers",
        settings,
        lambda: TransformersMLLM(
            path, sampling, device=cfg.device, batch_size=cfg.batch_size, dtype=cfg.dtype, video_input=cfg.video_input
        ),
    )


def _table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=DESCRIPTIONS) if rows else DESCRIPTIONS.empty_table()


# ------------------------------------------------------------------------------- generating engines
def generate_isolating_rejects(engine, requests: list[Request]) -> list[Generation | str]:
    """All requests in one engine call; if the engine rejects the call (vLLM fails the whole call for
    one invalid request, e.g. a prompt longer than max_model_len), retry one by one so only the bad
    requests fail — each as the error message in place of its Generation."""
    try:
        return list(engine.generate(requests))
    except RequestRejected:
        pass
    results: list[Generation | str] = []
    for request in requests:
        try:
            results.extend(engine.generate([request]))
        except RequestRejected as error:
            results.append(str(error).splitlines()[0] if str(error) else type(error).__name__)
    return results


def items_of(units: Sequence[dict]) -> list[dict]:
    """The distinct items of some units, in order (an item's media is decoded once for all its views)."""
    seen: dict[str, dict] = {}
    for unit in units:
        seen.setdefault(unit["item_id"], unit)
    return list(seen.values())


def _generating_processor(ctx: StageContext[DescribeConfig], prefetcher: ShardPrefetcher):
    cfg = ctx.section
    sampling_json = keyed_sampling(cfg)
    model = ctx.keyed("model")
    sampled = cfg.temperature > 0

    def process(shard: list[dict], index: int) -> ShardResult:
        errors: list[ItemError | tuple[str, str]] = []
        frames_of: dict[str, list] = {}
        for item, frames in prefetcher.take(index, items_of(shard)):
            if isinstance(frames, MediaError):
                errors.append(frames.item_error(item))
            else:
                frames_of[item["item_id"]] = frames
        requests = [
            Request(
                unit["item_id"],
                unit["view_id"],
                unit["prompt"],
                frames_of[unit["item_id"]],
                unit["media_type"],
                request_seed(cfg.seed, unit["item_id"], unit["view_id"]),
            )
            for unit in shard
            if unit["item_id"] in frames_of
        ]
        generations: list[Generation | str] = []
        seconds = 0.0
        if requests:
            engine = make_engine(cfg)
            started = time.perf_counter()
            generations = generate_isolating_rejects(engine, requests)
            seconds = time.perf_counter() - started
        # One error row per failed item (not per view), so max_error_rate stays a share of items.
        rows: list[dict] = []
        empty_views: dict[str, list[str]] = {}
        rejected: dict[str, tuple[list[str], str]] = {}
        for request, generation in zip(requests, generations):
            if isinstance(generation, str):
                rejected.setdefault(request.item_id, ([], generation))[0].append(request.view_id)
                continue
            if not generation.text:
                empty_views.setdefault(request.item_id, []).append(request.view_id)
                continue
            rows.append(
                {
                    "item_id": request.item_id,
                    "view_id": request.view_id,
                    "prompt": request.prompt,
                    "description": generation.text,
                    "n_tokens": len(generation.token_ids),
                    "engine": cfg.engine,
                    "model": model["name"],
                    "model_digest": model["content"],
                    "sampling": sampling_json,
                    "seed": request.seed if sampled else None,
                    "seconds": seconds / len(requests),
                }
            )
        errors += [
            (item_id, f"the engine rejected view(s) {views}: {message}")
            for item_id, (views, message) in rejected.items()
        ]
        errors += [
            (item_id, f"model produced an empty description for view(s) {views}")
            for item_id, views in empty_views.items()
        ]
        tokens = sum(len(g.token_ids) for g in generations if isinstance(g, Generation))
        return ShardResult(
            _table(rows),
            errors,
            {
                "tokens": float(tokens),
                "generation_seconds": seconds,
                "requests": float(len(requests)),
                "items": float(len(items_of(shard))),
            },
        )

    return process


# ------------------------------------------------------------------------------- import
def _import_processor(ctx: StageContext[DescribeConfig]):
    cfg = ctx.section
    source = Path(str(cfg.import_path))  # set for the import engine (check_config)
    imported = load_imported_descriptions(source, cfg.import_view)
    keyed_file = ctx.keyed("import_path")
    model = imported.model or keyed_file["name"]  # what wrote them, where the file says so

    def process(shard: list[dict], index: int) -> ShardResult:
        rows, errors = [], []
        for item in shard:
            views = imported.by_item.get(item["item_id"])
            if not views:
                errors.append((item["item_id"], f"no description for this item in {source.name}"))
                continue
            empty = [view_id for view_id, text in views.items() if not text.strip()]
            if empty:
                errors.append((item["item_id"], f"empty description for view(s) {empty} in {source.name}"))
            for view_id, text in views.items():
                if text.strip():
                    # The prompt VideoChat2 (or whatever wrote the file) was given is not known here.
                    rows.append(
                        {
                            "item_id": item["item_id"],
                            "view_id": view_id,
                            "prompt": "",
                            "description": text.strip(),
                            "n_tokens": None,
                            "engine": "import",
                            "model": model,
                            "model_digest": keyed_file["content"],
                            "sampling": "{}",
                            "seed": None,
                            "seconds": 0.0,
                        }
                    )
        return ShardResult(_table(rows), errors, {"items": float(len(shard))})

    return process


def shard_jobs(ctx: StageContext[DescribeConfig]) -> list[ShardJob]:
    """One job over (item, view) units, sharded by item. A description depends on its item's media
    bytes, media type and id (the sampling seed) and on its view's prompt: a unit with all of them
    unchanged keeps its description. Imported descriptions come per item, with the views the file has."""
    cfg = ctx.section
    items = work_items(ctx)
    if cfg.engine == "import":
        return [
            ShardJob(
                items,
                cfg.shard_size,
                DESCRIPTIONS,
                item_id=lambda item: item["item_id"],
                input_fields=("item_id", "media_type", "media_digest"),
                max_error_rate=cfg.max_error_rate,
                unit="items",
            )
        ]
    return [
        ShardJob(
            description_work(ctx),
            cfg.shard_size,
            DESCRIPTIONS,
            item_id=lambda unit: unit["item_id"],
            unit_columns=("item_id", "view_id"),
            input_fields=("item_id", "media_type", "media_digest", "view_id", "prompt"),
            group_of=lambda unit: unit["item_id"],
            max_error_rate=cfg.max_error_rate,
            unit="descriptions",
            error_base=len(items),
            error_unit="items",
        )
    ]


def run(ctx: StageContext[DescribeConfig]) -> None:
    cfg = ctx.section
    check_config(cfg)
    job = shard_jobs(ctx)[0]
    work = job.work
    started = time.perf_counter()
    prefetcher = None
    if cfg.engine == "import":
        process = _import_processor(ctx)
    else:
        split = ctx.plan_shards(job)  # media is decoded only for the items with a view to compute
        shards = [items_of(split.to_compute(i)) for i in range(len(split.shards))]
        load = ItemLoader(ctx.dataset_root, cfg.num_frames, cfg.fps, cfg.max_image_side)
        prefetcher = ShardPrefetcher(shards, load, workers=cfg.decode_workers, next_index=ctx.next_shard(len(shards)))
        process = _generating_processor(ctx, prefetcher)
    try:
        totals = ctx.run_shards(replace(job, process=process))
    finally:
        if prefetcher is not None:
            prefetcher.close()
    wall = time.perf_counter() - started
    stats = totals.stats
    items_done = stats.get("items", 0.0)  # items of the shards computed by this call (not resumed ones)
    items = len(items_of(work))
    generation_seconds = stats.get("generation_seconds", 0.0)
    ctx.summary.update(
        engine=cfg.engine,
        model=Path(cfg.model).name if cfg.model else None,
        import_path=str(cfg.import_path) if cfg.engine == "import" else None,
        views={"image": list(cfg.image_views), "video": list(cfg.video_views)},
        items=items,
        descriptions=totals.rows,
        errors=totals.errors,
        shards_done=totals.shards_done,
        shards_resumed=totals.shards_resumed,
        # Throughput of the shards this call computed:
        tokens=int(stats.get("tokens", 0)),
        generation_seconds=round(generation_seconds, 3),
        tokens_per_s=round(stats.get("tokens", 0) / generation_seconds, 1) if generation_seconds > 0 else None,
        items_per_s=round(items_done / wall, 2) if wall > 0 and items_done else None,
        decode_wait_seconds=round(prefetcher.wait_seconds, 3) if prefetcher is not None else None,
    )
    rates = [
        f"{value} {unit}"
        for value, unit in ((ctx.summary["tokens_per_s"], "tokens/s"), (ctx.summary["items_per_s"], "items/s"))
        if value is not None
    ]
    if ctx.summary["decode_wait_seconds"] is not None:  # only a generating engine decodes media
        rates.append(f"engine waited {ctx.summary['decode_wait_seconds']}s on decoding")
    ctx.log.info(
        "describe: %d descriptions of %d items (%d errors)%s",
        totals.rows,
        items,
        totals.errors,
        "; " + ", ".join(rates) if rates else "",
    )


def key_config(cfg: ExperimentConfig, fingerprints) -> dict:
    """Where a generating engine runs (a GPU and a CPU give other tokens)."""
    if cfg.describe.engine == "import":
        return {}
    from leccr.runtime.device import resolved_numerics

    return {"numerics": resolved_numerics(cfg, "describe", cfg.describe.device)}


# A view's prompt goes into each unit's input instead of the memo salt; splits and the shard size only
# choose and group the units.
STAGE = StageDef(
    name="describe",
    upstream=("dataset",),
    reads={"dataset": ("items.parquet",)},
    section=section,
    run=run,
    sharded=True,
    key_config=key_config,
    shard_jobs=shard_jobs,
    memo_excludes=("image_views", "video_views", "splits", "shard_size"),
)
