"""Benchmarks of the features storage and readers (issue 4). Ratios against baselines measured in the
same run, so the figures compare across machines.

    .venv/bin/python benchmarks/bench_features.py [--rows 100000] [--dim 512]

(a) write + read of a rows x dim float32 embedding table through our Parquet layout
    (fixed_size_list<float32>[dim], row groups of ROW_GROUP_BYTES) vs numpy.save / numpy.load;
    read both as a Parquet decode into memory and through the memory-mapped Arrow cache.
(b) TrainingDataset batches/s (get_batch, and per-sample __getitem__ + collate) vs indexing
    in-memory padded tensors with the same batch indices.
(c) feature extraction images/s of the tiny CLIP vision tower on CPU.
(d) Parquet write options for the float array column, on the same matrix: pyarrow's defaults
    (dictionary, statistics, snappy) vs dictionary and statistics off with compression none / zstd /
    byte-stream-split + zstd; write and read seconds as ratios to numpy.save / numpy.load, and size.
(e) the visual stage (leccr.stages.visual.run: decode prefetch, extraction, shard commits, manifest) vs bare
    extraction on the same images: the encoder loaded, then every image read from its file and encoded,
    in a plain loop, nothing stored. Goal: stage <= 1.1x bare, i.e. storage hidden behind extraction.
    The stage runs once with the background shard writer (as it always runs) and once committing inline.
    Also printed: the stage against encoding alone (images decoded before the clock starts), which
    shows what decoding costs beside the encoder.

    .venv/bin/python benchmarks/bench_features.py --only write-options,stage   # (d) and (e) only
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from leccr.data import FeatureTables, TrainingDataset
from leccr.data.tables import open_parts
from leccr.features.storage import ids_column, rows_per_group
from leccr.schemas.core import write_options, write_table
from leccr.schemas.features import TEXT_TOKENS, description_schema, visual_schema


def best_of(fn, repeat=3):
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def bench_table(folder: Path, rows: int, dim: int) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    matrix = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
    npy = folder / "matrix.npy"
    parquet = folder / "emb" / "part-00000.parquet"
    schema = pa.schema([pa.field("item_id", pa.string(), nullable=False),
                        pa.field("features", pa.list_(pa.float32(), dim), nullable=False)])
    ids = pa.array([f"item{i:07d}" for i in range(rows)])

    def write_ours():
        features = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), dim)  # zero-copy wrap
        table = pa.table({"item_id": ids, "features": features})
        write_table(table, parquet, schema, rows_per_group(dim * 4))

    def read_ours():
        table = pq.read_table(parquet, memory_map=True)
        values = table.column("features").chunks
        return [c.flatten().to_numpy(zero_copy_only=True) for c in values]

    def read_ours_mapped():
        table = open_parts([parquet], folder / "cache")
        return [c.flatten().to_numpy(zero_copy_only=True) for c in table.column("features").chunks]

    def read_ours_mapped_touch():  # mapping is lazy: also touch every value (a full pass, as an epoch does)
        return sum(float(v.sum()) for v in read_ours_mapped())

    write_npy = best_of(lambda: np.save(npy, matrix))
    write_parquet = best_of(write_ours)
    read_npy = best_of(lambda: np.load(npy))
    read_parquet = best_of(read_ours)
    read_ours_mapped()  # builds the Arrow cache once
    read_mapped = best_of(read_ours_mapped)
    touch_npy = best_of(lambda: float(np.load(npy, mmap_mode="r").sum()))
    touch_mapped = best_of(read_ours_mapped_touch)
    got = np.concatenate(read_ours())
    assert got.tobytes() == matrix.tobytes(), "round trip is not bit-exact"
    return {
        "rows": rows, "dim": dim, "mb": round(matrix.nbytes / 2**20, 1),
        "parquet_mb": round(parquet.stat().st_size / 2**20, 1),
        "write_npy_s": round(write_npy, 3), "write_parquet_s": round(write_parquet, 3),
        "write_ratio": round(write_parquet / write_npy, 2),
        "read_npy_s": round(read_npy, 3), "read_parquet_s": round(read_parquet, 3),
        "read_ratio": round(read_parquet / read_npy, 2),
        "open_arrow_mmap_s": round(read_mapped, 4),
        "full_pass_npy_mmap_s": round(touch_npy, 3), "full_pass_arrow_mmap_s": round(touch_mapped, 3),
        "full_pass_ratio": round(touch_mapped / touch_npy, 2),
    }


def build_artifact(root: Path, items: int, tokens: int, dim: int, captions_per_item: int = 2) -> None:
    rng = np.random.default_rng(1)
    visual = rng.standard_normal((items, tokens * dim)).astype(np.float32)
    ids = [f"i{n:06d}" for n in range(items)]
    write_table(pa.table({
        "item_id": ids, "split": ["train"] * items, "media_type": ["image"] * items,
        "n_tokens": pa.array([tokens] * items, pa.int32()), "dim": pa.array([dim] * items, pa.int32()),
        "features": pa.FixedSizeListArray.from_arrays(pa.array(visual.reshape(-1)), tokens * dim),
    }), root / "visual" / "part-00000.parquet", visual_schema("float32", tokens * dim), rows_per_group(tokens * dim * 4))
    rows = []
    for n, item in enumerate(ids):
        for c in range(captions_per_item):
            length = int(rng.integers(8, 30))
            for lang, kind in (("en", "human"), ("de", "mt")):
                rows.append({"item_id": item, "caption_id": f"{item}-{c}", "split": "train", "lang": lang, "kind": kind,
                             "source": "dataset", "ids": rng.integers(5, 1000, length).tolist()})
    write_table(pa.table({
        **{k: [r[k] for r in rows] for k in ("item_id", "caption_id", "split", "lang", "kind", "source")},
        "n_tokens": pa.array([len(r["ids"]) for r in rows], pa.int32()), "input_ids": ids_column([r["ids"] for r in rows]),
    }), root / "text" / "part-00000.parquet", TEXT_TOKENS)
    desc = [rng.integers(5, 1000, int(rng.integers(20, 60))).tolist() for _ in ids]
    schema = description_schema(None)
    write_table(pa.table({"item_id": ids, "split": ["train"] * items,
                          "views": pa.array([["scene"]] * items, pa.list_(pa.string())),
                          "n_tokens": pa.array([len(d) for d in desc], pa.int32()), "input_ids": ids_column(desc)}),
                root / "descriptions" / "part-00000.parquet", schema)
    write_table(pa.table({"item_id": [""], "split": [""], "views": pa.array([[]], pa.list_(pa.string())),
                          "n_tokens": pa.array([2], pa.int32()), "input_ids": ids_column([[2, 3]])}),
                root / "descriptions" / "empty.parquet", schema)
    (root / "features_info.json").write_text(json.dumps({"pad_token_id": 0, "descriptions": {"states": False}}))


def bench_reader(root: Path, items: int, tokens: int, dim: int, batch_size: int = 128, batches: int = 60) -> dict:
    build_artifact(root, items, tokens, dim)
    dataset = TrainingDataset(FeatureTables.open(root), "de")
    order = np.random.default_rng(2).permutation(len(dataset))
    batches_idx = [order[i * batch_size:(i + 1) * batch_size] for i in range(min(batches, len(order) // batch_size))]
    n_samples = sum(len(b) for b in batches_idx)

    # In-memory baseline: the same data as padded tensors, indexed per batch.
    tables = dataset.tables
    visual = torch.from_numpy(tables.visual_values.gather(np.arange(items)).reshape(items, tokens, dim))

    def padded(rows):
        seqs = [torch.from_numpy(tables.text_ids[int(r)].astype(np.int64)) for r in rows]
        return torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)

    en, tgt = padded(dataset.en_rows), padded(dataset.tgt_rows)
    desc = torch.nn.utils.rnn.pad_sequence(
        [torch.from_numpy(tables.desc_ids[int(r)].astype(np.int64)) for r in dataset.desc_rows], batch_first=True)
    item_index = torch.from_numpy(dataset.item_index)

    def baseline():
        for b in batches_idx:
            index = torch.from_numpy(b)
            items_b = item_index[index]
            _ = (visual[items_b], en[index], en[index] != 0, tgt[index], tgt[index] != 0, desc[index], desc[index] != 0)

    def ours_batched():
        for b in batches_idx:
            dataset.get_batch(b)

    collate = dataset.collate_fn()

    def ours_samples():
        for b in batches_idx:
            collate([dataset[int(i)] for i in b])

    t_base, t_batched, t_samples = best_of(baseline), best_of(ours_batched), best_of(ours_samples)
    return {
        "items": items, "tokens": tokens, "dim": dim, "samples": len(dataset), "batch_size": batch_size,
        "baseline_samples_per_s": round(n_samples / t_base), "get_batch_samples_per_s": round(n_samples / t_batched),
        "getitem_collate_samples_per_s": round(n_samples / t_samples),
        "get_batch_vs_baseline": round(t_batched / t_base, 2), "getitem_vs_baseline": round(t_samples / t_base, 2),
    }


def bench_extraction(folder: Path, images: int = 256, batch_size: int = 64) -> dict:
    from PIL import Image

    from leccr.features.vision import VisionEncoder
    from leccr.tiny_models.vision import build_vision

    path = build_vision(folder / "vision", seed=0)
    encoder = VisionEncoder(path, device="cpu")
    rng = np.random.default_rng(3)
    pil = [Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for _ in range(images)]
    encoder.encode(pil[:batch_size])  # warm-up

    def run():
        for i in range(0, images, batch_size):
            encoder.encode(pil[i:i + batch_size])

    seconds = best_of(run, 2)
    return {"images": images, "batch_size": batch_size, "images_per_s": round(images / seconds, 1),
            "torch_threads": torch.get_num_threads()}


WRITE_OPTIONS = {
    "pyarrow defaults": {},
    "plain (write_table's choice)": "write_options",
    "zstd": {"use_dictionary": ["item_id"], "write_statistics": ["item_id"],
             "compression": {"item_id": "snappy", "features": "zstd"}},
    "byte-stream-split + zstd": {"use_dictionary": ["item_id"], "write_statistics": ["item_id"],
                                 "compression": {"item_id": "snappy", "features": "zstd"},
                                 "use_byte_stream_split": ["features"]},
}


def bench_write_options(folder: Path, rows: int, dim: int) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    # model features are not white noise: a smooth, low-rank-ish matrix compresses as real ones might
    rng = np.random.default_rng(0)
    matrix = (rng.standard_normal((rows, 16)) @ rng.standard_normal((16, dim))).astype(np.float32)
    matrix += 0.1 * rng.standard_normal((rows, dim)).astype(np.float32)
    table = pa.table({"item_id": pa.array([f"item{i:07d}" for i in range(rows)]),
                      "features": pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), dim)})
    npy = folder / "matrix.npy"
    write_npy, read_npy = best_of(lambda: np.save(npy, matrix)), best_of(lambda: np.load(npy))
    results = {"rows": rows, "dim": dim, "npy_mb": round(npy.stat().st_size / 2**20, 1),
               "write_npy_s": round(write_npy, 3), "read_npy_s": round(read_npy, 3)}
    for name, options in WRITE_OPTIONS.items():
        options = write_options(table.schema) if options == "write_options" else options
        path = folder / f"{name.replace(' ', '_')}.parquet"
        write = best_of(lambda: pq.write_table(table, path, row_group_size=rows_per_group(dim * 4), **options))
        read = best_of(lambda: pq.read_table(path))
        assert pq.read_table(path).equals(table)
        results[name] = {"write_s": round(write, 3), "write_vs_npy": round(write / write_npy, 2),
                         "read_s": round(read, 3), "read_vs_npy": round(read / read_npy, 2),
                         "size_vs_npy": round(path.stat().st_size / npy.stat().st_size, 3)}
    return results


def photo_like_image(rng: np.random.Generator, width: int, height: int):
    """A JPEG-friendly picture: a colour gradient with a few flat rectangles and mild noise. Pure noise
    decodes several times slower than a photo of the same size, which would flatter the prefetch."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, rng.integers(0, 256))], -1)
    for _ in range(4):
        top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
        pixels[top:top + height // 4, left:left + width // 4] = rng.integers(0, 256, 3)
    pixels = pixels + rng.integers(-8, 9, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def bench_stage(folder: Path, images: int = 512, shard_size: int = 64, batch_size: int = 32,
                image_size: tuple[int, int] = (500, 375)) -> dict:
    """The visual stage vs bare extraction on the same images (see the module docstring, (e))."""
    import logging


    import leccr.stages.visual as visual
    from leccr.config import VisualConfig
    from leccr.features.vision import VisionEncoder
    from leccr.media.decode import load_visual
    from leccr.core.artifact import Artifact
    from leccr.core.context import StageContext
    from leccr.tiny_models.vision import build_vision
    from leccr.schemas.dataset import ITEMS

    model = build_vision(folder / "vision", seed=0)
    rng = np.random.default_rng(4)
    dataset = folder / "dataset"
    (dataset / "media").mkdir(parents=True)
    rows = []
    width, height = image_size
    for n in range(images):
        path = dataset / "media" / f"{n:05d}.jpg"
        photo_like_image(rng, width, height).save(path, quality=90)
        rows.append({"item_id": f"i{n:05d}", "split": "train", "media_type": "image", "path": str(path),
                     "feature_path": None})
    write_table(pa.Table.from_pylist(rows, schema=ITEMS), dataset / "items.parquet", ITEMS)
    section = VisualConfig(visual_source="model", vision_model=str(model), visual_output="tokens", image_size=None,
                           num_frames=None, fps=None, precision="fp32", visual_dtype="float32", import_path=None,
                           shard_size=shard_size, batch_size=batch_size, device="cpu")
    log = logging.getLogger("bench_features.stage")
    log.setLevel(logging.WARNING)

    def bare(predecoded: bool = False) -> float:
        decoded = [load_visual(row["path"], "image", None, None)[0] for row in rows] if predecoded else None
        started = time.perf_counter()
        encoder = VisionEncoder(str(model), "tokens", None, "cpu", "fp32")
        for i in range(0, len(rows), batch_size):
            batch = decoded[i:i + batch_size] if predecoded else [
                load_visual(row["path"], "image", None, None)[0] for row in rows[i:i + batch_size]]
            encoder.encode(batch)
        return time.perf_counter() - started

    def stage(run: int, background: bool) -> float:
        out = folder / f"stage{run}"
        out.mkdir()
        ctx = StageContext("visual", f"bench{run}", section, {"dataset": Artifact("dataset", "bench", dataset)},
                           out, log)
        if not background:  # the same stage, committing each shard inline
            run_shards = ctx.run_shards
            ctx.run_shards = lambda *a, **k: run_shards(*a, **{**k, "background_write": False})
        started = time.perf_counter()
        visual.run(ctx)
        return time.perf_counter() - started

    bare()  # warm-up: imports, allocator, page cache of the images
    times = {"bare": [], "encode only": [], "stage": [], "stage (inline commits)": []}
    for run in range(2):  # alternated, best of each: a change of machine load hits every variant
        times["bare"].append(bare())
        times["encode only"].append(bare(predecoded=True))
        times["stage"].append(stage(2 * run, True))
        times["stage (inline commits)"].append(stage(2 * run + 1, False))
    best = {name: min(values) for name, values in times.items()}
    return {"images": images, "image_size": f"{width}x{height}", "shard_size": shard_size, "batch_size": batch_size,
            **{f"{name}_s": round(value, 3) for name, value in best.items()},
            "stage_vs_bare": round(best["stage"] / best["bare"], 3),
            "stage_vs_encode_only": round(best["stage"] / best["encode only"], 3),
            "inline_commits_vs_bare": round(best["stage (inline commits)"] / best["bare"], 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--reader-items", type=int, default=5000)
    parser.add_argument("--reader-tokens", type=int, default=50)
    parser.add_argument("--reader-dim", type=int, default=512)
    parser.add_argument("--stage-images", type=int, default=512)
    parser.add_argument("--stage-image-size", default="500x375",
                        help="WxH of the stage section's JPEGs (default: a typical Flickr30k/Multi30k photo)")
    parser.add_argument("--only", default="table,reader,extraction,write-options,stage",
                        help="comma-separated sections to run")
    args = parser.parse_args(argv)
    sections = {
        "table": lambda tmp: bench_table(tmp / "a", args.rows, args.dim),
        "reader": lambda tmp: bench_reader(tmp / "b", args.reader_items, args.reader_tokens, args.reader_dim),
        "extraction": lambda tmp: bench_extraction(tmp / "c"),
        "write-options": lambda tmp: bench_write_options(tmp / "d", args.rows // 8, args.dim * 17 // 8),
        "stage": lambda tmp: bench_stage(tmp / "e", args.stage_images,
                                         image_size=tuple(int(v) for v in args.stage_image_size.split("x"))),
    }
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: sections[name](Path(tmp)) for name in args.only.split(",")}
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
