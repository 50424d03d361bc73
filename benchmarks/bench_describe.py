"""Describe benchmark: the same model and inputs through the vLLM and transformers engines; video
decoding with decord (sampled frames) against PyAV decoding every frame; and, in the describe stage
itself, how long the engine waits on decoding with background prefetch, and the stage's items/s against
the engine's items/s on the same requests with every video decoded in memory beforehand (goal >= 0.9).

    python benchmarks/bench_describe.py [--model DIR] [--items 32] [--max-tokens 32] [--out results.json]

Without --model it builds the tiny LLaVA (random weights; the CPU demo model). Both engines run
greedy on identical requests after a warm-up call; the report gives tokens/s each, the ratio
vLLM / transformers, and whether the two produced the same tokens. At toy sizes on CPU vLLM's
per-step overhead dominates; its advantage is a GPU, real-size-model property — run this with a real
LLaVA folder on a GPU machine for the figure that matters.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine; set before vllm import


def _requests(folder: Path, items: int, frames_per_video: int):
    import numpy as np
    from PIL import Image

    from leccr.engines.mllm import Request
    from leccr.media.decode import sample_frames
    from leccr.prompts import default_views

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from tests.test_media import write_mp4

    requests = []
    views = default_views("image")
    for index in range(items):
        pixels = np.random.RandomState(index).randint(0, 256, (48, 64, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        for view_id in ("objects", "detailed"):
            requests.append(Request(f"img{index}", view_id, views[view_id], [image], "image", 0))
    for index in range(max(1, items // 8)):
        frames = sample_frames(write_mp4(folder / f"v{index}.mp4", num_frames=24, noise_seed=index),
                               num_frames=frames_per_video)
        requests.append(Request(f"vid{index}", "actions", default_views("video")["actions"], frames, "video", 0))
    return requests


def _timed(generate, requests, repeats: int):
    """(outputs, median seconds) over `repeats` runs: the machine may be shared, so one run can be an outlier."""
    import statistics

    times, outputs = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        outputs = generate(requests)
        times.append(time.perf_counter() - started)
    return outputs, statistics.median(times), [round(t, 3) for t in times]


def bench_engines(model: Path, requests, max_tokens: int, batch_size: int, frames_per_video: int,
                  repeats: int = 3) -> dict:
    from leccr.engines.mllm import SamplingConfig, TransformersMLLM, VllmMLLM

    sampling = SamplingConfig(max_tokens=max_tokens)
    results: dict = {"requests": len(requests), "max_tokens": max_tokens}

    started = time.perf_counter()
    hf = TransformersMLLM(model, sampling, batch_size=batch_size, dtype="float32")
    results["transformers_load_s"] = round(time.perf_counter() - started, 2)
    hf.generate(requests[:2])  # warm-up
    hf_out, hf_s, hf_runs = _timed(hf.generate, requests, repeats)
    hf_tokens = sum(len(g.token_ids) for g in hf_out)
    results["transformers"] = {"tokens": hf_tokens, "seconds_median": round(hf_s, 3), "runs_s": hf_runs,
                               "tokens_per_s": round(hf_tokens / hf_s, 1), "batch_size": batch_size}
    del hf

    try:
        import vllm
    except ImportError as error:
        results["vllm"] = f"not installed: {error}"
        return results
    started = time.perf_counter()
    engine = VllmMLLM(model, sampling, max_images_per_prompt=frames_per_video, dtype="float32",
                      gpu_memory_utilization=0.3,
                      options={"enforce_eager": True, "kv_cache_memory_bytes": 256 * 2**20})
    results["vllm_start_s"] = round(time.perf_counter() - started, 2)
    engine.generate(requests[:2])  # warm-up
    vllm_out, vllm_s, vllm_runs = _timed(engine.generate, requests, repeats)
    vllm_tokens = sum(len(g.token_ids) for g in vllm_out)
    results["vllm"] = {"version": vllm.__version__, "tokens": vllm_tokens, "seconds_median": round(vllm_s, 3),
                       "runs_s": vllm_runs, "tokens_per_s": round(vllm_tokens / vllm_s, 1),
                       "all_requests_in_one_generate_call": True}
    results["ratio_vllm_over_transformers"] = round((vllm_tokens / vllm_s) / (hf_tokens / hf_s), 3)
    same = sum(a.token_ids == b.token_ids for a, b in zip(vllm_out, hf_out))
    results["same_greedy_tokens"] = f"{same}/{len(requests)}"
    return results


def write_natural_mp4(path: Path, frames: int, size: int, fps: int = 30, gop: int = 30, seed: int = 0) -> Path:
    """A smooth moving scene (gradient + a moving square), H.264 with a keyframe every `gop` frames,
    like real clips (1 s GOPs); random noise would make every frame an unrealistically costly decode."""
    import av
    import numpy as np

    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x * 255 // size, y * 255 // size, np.full_like(x, rng.randint(0, 256))], -1).astype(np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop
        for index in range(frames):
            pixels = base.copy()
            top = (index * 3) % (size - size // 4)
            pixels[top : top + size // 4, top : top + size // 4] = (255 - index) % 256
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def bench_decoding(folder: Path, videos: int, frames: int, size: int, sample: int, repeats: int = 3) -> dict:
    import av

    from leccr.media.decode import sample_frames

    paths = [write_natural_mp4(folder / f"decode{i}.mp4", frames, size, seed=i) for i in range(videos)]

    def with_decord(paths):
        for path in paths:
            sample_frames(path, num_frames=sample)

    def with_pyav(paths):
        decoded = 0
        for path in paths:
            with av.open(str(path)) as container:
                for frame in container.decode(video=0):
                    frame.to_ndarray(format="rgb24")
                    decoded += 1
        return decoded

    _, decord_s, decord_runs = _timed(with_decord, paths, repeats)
    decoded, pyav_s, pyav_runs = _timed(with_pyav, paths, repeats)
    return {
        "videos": videos, "frames_per_video": frames, "size": size, "gop": 30, "sampled_per_video": sample,
        "decord_sampled_frames_per_s": round(videos * sample / decord_s, 1),
        "decord_videos_per_s": round(videos / decord_s, 2),
        "pyav_all_frames_per_s": round(decoded / pyav_s, 1),
        "pyav_videos_per_s": round(videos / pyav_s, 2),
        "ratio_videos_per_s_decord_over_pyav": round(pyav_s / decord_s, 2),
        "runs_s": {"decord": decord_runs, "pyav": pyav_runs},
    }


def bench_stage_prefetch(folder: Path, model: Path, videos: int, frames: int, size: int, sample: int,
                         max_tokens: int) -> dict:
    """The describe stage over videos: how long the engine waited on decoding, against the decode time.

    Shards of 4 videos; while shard k is generated, shard k+1 is decoded in background threads, so the
    wait is about the first shard's decode plus any shard whose decode outlasts the previous generation.
    """
    import logging

    import pyarrow as pa

    import leccr.stages.describe as describe
    from leccr.config import DescribeConfig
    from leccr.engines.mllm import Request, request_seed
    from leccr.media.decode import load_visual, sample_frames
    from leccr.core.artifact import Artifact
    from leccr.core.context import StageContext
    from leccr.schemas.core import write_table
    from leccr.schemas.dataset import CAPTIONS, ITEMS

    data = folder / "stage_data"
    data.mkdir()
    paths = [write_natural_mp4(data / f"s{i}.mp4", frames, size, seed=100 + i) for i in range(videos)]
    started = time.perf_counter()
    for path in paths:
        sample_frames(path, num_frames=sample)
    serial_decode_s = time.perf_counter() - started
    items = [{"item_id": f"v{i:03d}", "split": "test", "media_type": "video", "path": str(p), "feature_path": None}
             for i, p in enumerate(paths)]
    write_table(pa.Table.from_pylist(items, schema=ITEMS), data / "items.parquet", ITEMS)
    write_table(CAPTIONS.empty_table(), data / "captions.parquet", CAPTIONS)
    cfg = DescribeConfig(model=str(model), num_frames=sample, max_tokens=max_tokens, shard_size=4, batch_size=16,
                         dtype="float32", video_views={"actions": "What happens?", "scene": "Where is this?"})
    out = folder / "stage_out"
    out.mkdir()
    engine = describe.make_engine(cfg)  # load the model first: this measures decoding against generation

    # The engine alone: the same requests, shard by shard, every video decoded in memory beforehand.
    decoded = [(item, load_visual(item["path"], "video", cfg.num_frames, cfg.fps, cfg.max_image_side))
               for item in items]
    shards = [[Request(item["item_id"], view_id, prompt, frames, "video", request_seed(cfg.seed, item["item_id"], view_id))
               for item, frames in decoded[i:i + cfg.shard_size] for view_id, prompt in cfg.video_views.items()]
              for i in range(0, len(decoded), cfg.shard_size)]

    def engine_alone() -> float:
        started = time.perf_counter()
        for requests in shards:
            engine.generate(requests)
        return time.perf_counter() - started

    def stage(run: int) -> tuple[float, dict]:
        out = folder / f"stage_out{run}"
        out.mkdir()
        ctx = StageContext("describe", "bench", cfg, {"dataset": Artifact("dataset", "bench", data)}, out,
                           logging.getLogger("bench.describe"))
        started = time.perf_counter()
        describe.run(ctx)
        return time.perf_counter() - started, ctx.summary

    engine_s, stage_s = [], []
    for run in range(2):  # alternated, best of each: a change of machine load hits both
        engine_s.append(engine_alone())
        stage_s.append(stage(run))
    wall, summary = min(stage_s, key=lambda run: run[0])
    return {"videos": videos, "shard_size": 4, "decode_workers": cfg.decode_workers, "max_tokens": max_tokens,
            "serial_decode_s": round(serial_decode_s, 3), "generation_s": summary["generation_seconds"],
            "engine_waited_on_decoding_s": summary["decode_wait_seconds"], "stage_wall_s": round(wall, 3),
            "items_per_s": summary["items_per_s"], "tokens_per_s": summary["tokens_per_s"],
            "engine_predecoded_s": round(min(engine_s), 3),
            "stage_vs_engine_items_per_s": round(min(engine_s) / wall, 3)}


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a LLaVA-family model folder (default: build the tiny LLaVA)")
    parser.add_argument("--items", type=int, default=32, help="images (2 views each); items/8 videos")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16, help="transformers prompts per generate call")
    parser.add_argument("--frames", type=int, default=8, help="frames per video request")
    parser.add_argument("--decode-videos", type=int, default=6)
    parser.add_argument("--decode-frames", type=int, default=300, help="frames in each decode-benchmark video (30 fps)")
    parser.add_argument("--decode-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per engine (median reported)")
    parser.add_argument("--skip-engines", action="store_true")
    parser.add_argument("--stage-only", action="store_true", help="only the describe stage vs the engine on pre-decoded inputs")
    from leccr.config import DescribeConfig

    parser.add_argument("--stage-max-tokens", type=int, default=DescribeConfig.model_fields["max_tokens"].default,
                        help="description length in the stage comparison (default: describe.max_tokens' default)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parents[1]))

    import torch

    report: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                "torch_threads": torch.get_num_threads(),
                                "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if not args.stage_only:
            report["decoding"] = bench_decoding(folder, args.decode_videos, args.decode_frames, args.decode_size,
                                                args.frames, args.repeats)
            print(json.dumps({"decoding": report["decoding"]}, indent=2), flush=True)
        if not args.skip_engines:
            model = args.model
            if model is None:
                from leccr.tiny_models.mllm import build_tiny_llava

                model = build_tiny_llava(folder / "tiny_llava", ["a dog runs on the grass", "a man rides a bike"], seed=0)
            report["model"] = str(model)
            report["stage_prefetch"] = bench_stage_prefetch(folder, model, 16, args.decode_frames, args.decode_size,
                                                            args.frames, args.stage_max_tokens)
            print(json.dumps({"stage_prefetch": report["stage_prefetch"]}, indent=2), flush=True)
            if args.stage_only:
                return report
            report["engines"] = bench_engines(model, _requests(folder, args.items, args.frames), args.max_tokens,
                                              args.batch_size, args.frames, args.repeats)
            print(json.dumps({"engines": report["engines"]}, indent=2), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
