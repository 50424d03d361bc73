"""The describe stage end to end on real media and the real tiny LLaVA through transformers: views,
errors.parquet, import engine, cache keys, and resume after the stage is killed mid-run."""
import json

from leccr.core.fingerprint import Fingerprinter
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

import leccr.stages.describe as describe
from leccr.config import DescribeConfig
from leccr.engines.mllm import (Request, SamplingConfig, TransformersMLLM, chat_prompt, load_imported_descriptions,
                                request_seed)
from leccr.media.decode import load_image, sample_frames
from leccr.core.fingerprint import Fingerprinter
from leccr.core.artifact import Artifact
from leccr.core.context import StageContext
from leccr.core.failures import StageFailed
from leccr.core.keys import KeyParts, resolve_section
from tests.builders import finish_handmade
from leccr.tiny_models.mllm import build_tiny_llava
from leccr.schemas.core import read_table, write_table
from leccr.schemas.dataset import CAPTIONS, ITEMS
from leccr.schemas.describe import DESCRIPTIONS
from leccr.schemas.errors import ERRORS
from tests.test_media import write_corrupt_mp4, write_mp4, write_png

CORPUS = ["a dog runs across the green grass", "two people ride bikes down a busy city street",
          "a red car is parked next to a tall tree", "a child plays with a ball on the beach",
          "a man is cooking food in a small kitchen"]


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    # One build per test session (build_tiny_llava skips a complete folder), shared with test_vllm_engine.
    return build_tiny_llava(tmp_path_factory.getbasetemp() / "tiny_llava", CORPUS, seed=0)


def make_dataset(folder: Path, n_images: int = 3, n_videos: int = 2, broken: bool = True) -> Artifact:
    """A dataset artifact over real PNGs and mp4s (plus a corrupt mp4 and a missing image if `broken`)."""
    media = folder / "media"
    media.mkdir(parents=True, exist_ok=True)
    items = [{"item_id": f"img{i}", "split": "test", "media_type": "image",
              "path": str(write_png(media / f"img{i}.png", 40 + 8 * i, 32, seed=i)), "feature_path": None}
             for i in range(n_images)]
    items += [{"item_id": f"vid{i}", "split": "train", "media_type": "video",
               "path": str(write_mp4(media / f"vid{i}.mp4", num_frames=12 + i, noise_seed=i)), "feature_path": None}
              for i in range(n_videos)]
    if broken:
        items += [{"item_id": "vid_corrupt", "split": "train", "media_type": "video",
                   "path": str(write_corrupt_mp4(media / "corrupt.mp4")), "feature_path": None},
                  {"item_id": "img_missing", "split": "test", "media_type": "image",
                   "path": str(media / "missing.png"), "feature_path": None}]
    write_table(pa.Table.from_pylist(items, schema=ITEMS), folder / "items.parquet", ITEMS)
    write_table(CAPTIONS.empty_table(), folder / "captions.parquet", CAPTIONS)
    return finish_handmade("dataset", folder, "test")


def make_context(cfg: DescribeConfig, dataset: Artifact, out: Path) -> StageContext:
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(stage="describe", key="test", section=cfg, inputs={"dataset": dataset}, out_dir=out,
                        log=logging.getLogger("test.describe"))


TWO_VIEWS = {"objects": "What objects are there?", "scene": "Where is this?"}


def small_config(model: Path, **overrides) -> DescribeConfig:
    settings = dict(engine="transformers", model=str(model), image_views=TWO_VIEWS,
                    video_views={"actions": "What happens?"}, num_frames=3, max_tokens=6, shard_size=3,
                    batch_size=4, dtype="float32", max_error_rate=0.5)
    return DescribeConfig(**{**settings, **overrides})


def test_transformers_stage_describes_every_view_and_records_bad_media(tiny_llava, tmp_path):
    dataset = make_dataset(tmp_path / "dataset")
    cfg = small_config(tiny_llava)
    ctx = make_context(cfg, dataset, tmp_path / "out")
    describe.run(ctx)

    table = read_table(sorted(ctx.out_dir.glob("part-*.parquet")), DESCRIPTIONS)
    got = sorted(zip(table.column("item_id").to_pylist(), table.column("view_id").to_pylist()))
    # 3 images x 2 image views + 2 videos x 1 video view; the corrupt mp4 and the missing png have none
    assert got == sorted([(f"img{i}", v) for i in range(3) for v in TWO_VIEWS] + [("vid0", "actions"), ("vid1", "actions")])
    rows = table.to_pylist()
    for row in rows:
        views = TWO_VIEWS if row["item_id"].startswith("img") else {"actions": "What happens?"}
        assert row["prompt"] == views[row["view_id"]]
        assert row["description"] and 1 <= row["n_tokens"] <= 6
        assert row["engine"] == "transformers" and row["model"] == tiny_llava.name
        assert row["model_digest"] == Fingerprinter().path(tiny_llava)  # the model as the key counts it
        # greedy: what the key counts, and nothing it leaves out (top_p, seeds draw no random numbers)
        assert json.loads(row["sampling"]) == {"temperature": 0.0, "max_tokens": 6}
        assert row["seed"] is None
        assert row["seconds"] > 0

    errors = {r["item_id"]: r["reason"] for r in read_table(ctx.out_dir / "errors.parquet", ERRORS).to_pylist()}
    assert set(errors) == {"vid_corrupt", "img_missing"}
    assert "cannot open video" in errors["vid_corrupt"] and "corrupt.mp4" in errors["vid_corrupt"]
    assert "file not found" in errors["img_missing"]

    summary = ctx.summary
    assert summary["items"] == 7 and summary["descriptions"] == 8 and summary["errors"] == 2
    assert summary["tokens"] == sum(r["n_tokens"] for r in rows)
    assert summary["tokens_per_s"] > 0 and summary["items_per_s"] > 0
    # what a DuckDB user sees
    count, = duckdb.sql(f"SELECT count(*) FROM read_parquet('{ctx.out_dir}/part-*.parquet') "
                        "WHERE view_id = 'actions'").fetchall()[0]
    assert count == 2


def test_stage_rows_match_a_direct_engine_call_on_decoded_frames(tiny_llava, tmp_path):
    """The stage's video description is what the engine says about the frames decord samples."""
    dataset = make_dataset(tmp_path / "dataset", n_images=1, n_videos=1, broken=False)
    cfg = small_config(tiny_llava, shard_size=8)
    ctx = make_context(cfg, dataset, tmp_path / "out")
    describe.run(ctx)
    table = read_table(sorted(ctx.out_dir.glob("part-*.parquet")), DESCRIPTIONS)
    stage_text = {(r["item_id"], r["view_id"]): r["description"] for r in table.to_pylist()}

    engine = TransformersMLLM(tiny_llava, SamplingConfig(max_tokens=6), batch_size=1, dtype="float32")
    frames = sample_frames(dataset.path / "media" / "vid0.mp4", num_frames=3)
    image = load_image(dataset.path / "media" / "img0.png")
    alone = engine.generate([Request("vid0", "actions", "What happens?", frames, "video", 0),
                             Request("img0", "scene", "Where is this?", [image], "image", 0)])
    assert stage_text[("vid0", "actions")] == alone[0].text
    assert stage_text[("img0", "scene")] == alone[1].text
    # the prompt carries one <image> per frame, through the model's own chat template
    assert chat_prompt(engine.processor, Request("v", "a", "Hi?", frames, "video", 0), "images") == \
        "USER: <image>\n<image>\n<image>\nHi? ASSISTANT:"


def test_sampled_descriptions_do_not_depend_on_the_batch_size(tiny_llava, tmp_path):
    """At temperature > 0 the batch size is out of the key (test_cache_key_follows_prompts_and_sampling_not_batching):
    each (item, view) samples with its own seed, so the stage writes the same descriptions with any."""
    dataset = make_dataset(tmp_path / "dataset", n_images=2, n_videos=1, broken=False)
    written = {}
    for batch_size in (1, 5):
        ctx = make_context(small_config(tiny_llava, temperature=1.0, top_p=0.9, batch_size=batch_size), dataset,
                           tmp_path / f"batch-{batch_size}")
        describe.run(ctx)
        table = read_table(sorted(ctx.out_dir.glob("part-*.parquet")), DESCRIPTIONS)
        written[batch_size] = sorted((r["item_id"], r["view_id"], r["seed"], r["n_tokens"], r["description"])
                                     for r in table.to_pylist())
    assert len(written[1]) == 5 and written[1] == written[5]


def test_import_engine_reads_videochat2_style_json(tmp_path):
    dataset = make_dataset(tmp_path / "dataset", n_images=2, n_videos=1, broken=False)
    source = tmp_path / "videochat2.json"
    source.write_text(json.dumps({"img0": "A dog on grass.",
                                  "vid0": {"actions": "A man cooks.", "scene": "A kitchen."}}))
    cfg = DescribeConfig(engine="import", import_path=str(source), import_view="detailed", max_error_rate=0.5)
    ctx = make_context(cfg, dataset, tmp_path / "out")
    describe.run(ctx)
    rows = read_table(sorted(ctx.out_dir.glob("part-*.parquet")), DESCRIPTIONS).to_pylist()
    got = {(r["item_id"], r["view_id"]): r["description"] for r in rows}
    assert got == {("img0", "detailed"): "A dog on grass.", ("vid0", "actions"): "A man cooks.",
                   ("vid0", "scene"): "A kitchen."}
    assert all(r["engine"] == "import" and r["model"] == "videochat2.json" and r["n_tokens"] is None for r in rows)
    errors = read_table(ctx.out_dir / "errors.parquet", ERRORS).to_pylist()
    assert [(e["item_id"], e["reason"]) for e in errors] == [("img1", "no description for this item in videochat2.json")]


def test_an_import_file_may_name_what_wrote_it(tmp_path):
    dataset = make_dataset(tmp_path / "dataset", n_images=1, n_videos=0, broken=False)
    source = tmp_path / "scene.json"
    source.write_text(json.dumps({"model": "scene descriptions from a generator", "descriptions": {
        "img0": {"objects": "a red circle", "scene": "a beach"}}}))
    ctx = make_context(DescribeConfig(engine="import", import_path=str(source)), dataset, tmp_path / "out")
    describe.run(ctx)
    rows = read_table(sorted(ctx.out_dir.glob("part-*.parquet")), DESCRIPTIONS).to_pylist()
    assert [(r["view_id"], r["engine"], r["model"]) for r in rows] == [
        ("objects", "import", "scene descriptions from a generator"),
        ("scene", "import", "scene descriptions from a generator")]
    source.write_text(json.dumps({"model": "", "descriptions": {"img0": "a red circle"}}))
    with pytest.raises(ValueError, match="must name what wrote the descriptions"):
        load_imported_descriptions(source, "detailed")


def test_import_file_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"x": 3}))
    with pytest.raises(ValueError, match="item 'x': expected a string"):
        load_imported_descriptions(bad, "detailed")
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        load_imported_descriptions(bad, "detailed")


def test_error_rate_above_threshold_fails_and_keeps_shards(tiny_llava, tmp_path):
    dataset = make_dataset(tmp_path / "dataset", n_images=1, n_videos=0)  # 2 of 3 items are broken
    cfg = small_config(tiny_llava, max_error_rate=0.1)
    ctx = make_context(cfg, dataset, tmp_path / "out")
    with pytest.raises(StageFailed, match="2 of 3 items failed"):
        describe.run(ctx)
    assert (ctx.out_dir / "part-00000.parquet").is_file()


def test_check_config_names_the_missing_source(tmp_path):
    with pytest.raises(ValueError, match="describe.model is required"):
        describe.check_config(DescribeConfig(engine="vllm"))
    with pytest.raises(ValueError, match="no model folder"):
        describe.check_config(DescribeConfig(model=str(tmp_path / "nothing")))
    with pytest.raises(ValueError, match="import_path is required"):
        describe.check_config(DescribeConfig(engine="import"))
    with pytest.raises(ValueError, match="num_frames or fps"):
        DescribeConfig(num_frames=None)


def test_cache_key_follows_prompts_and_sampling_not_batching(tiny_llava):
    base = small_config(tiny_llava)

    def key(cfg):
        return KeyParts("describe", "code", resolve_section(cfg, Fingerprinter()), {"dataset": "d"}).key

    assert key(base) == key(small_config(tiny_llava, batch_size=1, decode_workers=4, gpu_memory_utilization=0.3))
    # greedy decoding: seed and top_p draw nothing; vLLM-only settings do not touch the transformers engine
    assert key(base) == key(small_config(tiny_llava, seed=7, top_p=0.5, max_model_len=64))
    # sampling: each (item, view) with its own seed whatever its batch, so the batch size is not in the key
    sampled = small_config(tiny_llava, temperature=0.7)
    assert key(sampled) == key(small_config(tiny_llava, temperature=0.7, batch_size=1))
    assert key(sampled) != key(small_config(tiny_llava, temperature=0.7, seed=7))
    # import: only the file (by content) and its view matter
    imported = DescribeConfig(engine="import", import_path=str(tiny_llava / "config.json"))
    assert key(imported) == key(imported.model_copy(update={"max_tokens": 3, "model": "elsewhere", "num_frames": 2}))
    assert key(base) != key(small_config(tiny_llava, image_views={**TWO_VIEWS, "scene": "Where was it taken?"}))
    assert key(base) != key(small_config(tiny_llava, temperature=0.7))
    assert key(base) != key(small_config(tiny_llava, num_frames=4))
    # the default prompts are copied into the section, so their text is in the key too
    defaults = DescribeConfig(model=str(tiny_llava))
    assert "Describe this image in detail" in defaults.image_views["detailed"]
    assert set(defaults.video_views) == {"objects", "actions", "scene", "detailed"}


_KILLABLE_RUN = """
import json, logging, sys
from pathlib import Path
from leccr.config import DescribeConfig
from leccr.core.artifact import Artifact
from leccr.core.context import StageContext
import leccr.stages.describe as describe
args = json.loads(sys.argv[1])
ctx = StageContext(stage="describe", key="test", section=DescribeConfig(**args["cfg"]),
                   inputs={"dataset": Artifact("dataset", "test", Path(args["dataset"]))},
                   out_dir=Path(args["out"]), log=logging.getLogger("describe"))
describe.run(ctx)
"""


def test_killed_run_resumes_with_only_the_missing_shards(tiny_llava, tmp_path):
    dataset = make_dataset(tmp_path / "dataset", n_images=12, n_videos=0, broken=False)
    settings = dict(engine="transformers", model=str(tiny_llava), image_views=TWO_VIEWS, max_tokens=24,
                    shard_size=1, batch_size=2, dtype="float32")
    out = tmp_path / "out"
    out.mkdir()
    child = subprocess.Popen([sys.executable, "-c", _KILLABLE_RUN,
                              json.dumps({"cfg": settings, "dataset": str(dataset.path), "out": str(out)})],
                             cwd=Path(__file__).parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("part-*.parquet"))) < 2:
            assert child.poll() is None, f"the stage exited early: {child.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "the stage committed no shards within 120 s"
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("part-*.parquet")}
    print(f"killed after {len(before)} of 12 shards")
    assert 2 <= len(before) < 12, f"kill came too late to test resuming: {len(before)} of 12 shards done"

    ctx = make_context(DescribeConfig(**settings), dataset, out)
    describe.run(ctx)
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("part-*.parquet")}
    assert len(after) == 12
    assert {name: after[name] for name in before} == before  # committed shards untouched
    assert ctx.summary["shards_resumed"] == len(before)
    assert ctx.summary["shards_done"] == 12 - len(before)
    table = read_table(sorted(out.glob("part-*.parquet")), DESCRIPTIONS)
    assert table.num_rows == 12 * 2
    assert sorted(set(table.column("item_id").to_pylist())) == sorted(f"img{i}" for i in range(12))


def test_tiny_llava_is_deterministic_and_in_the_hub_layout(tiny_llava, tmp_path):
    from safetensors import safe_open
    from transformers import AutoProcessor

    again = build_tiny_llava(tmp_path / "again", CORPUS, seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_llava / name).read_bytes(), name
    with safe_open(str(tiny_llava / "model.safetensors"), "pt") as weights:
        vision = [k for k in weights.keys() if k.startswith("vision_tower.")]
    # vLLM's LLaVA (and llava-hf checkpoints) expect the CLIP tower under vision_tower.vision_model.
    assert vision and all(k.startswith("vision_tower.vision_model.") for k in vision)
    processor = AutoProcessor.from_pretrained(tiny_llava)
    image = load_image(write_png(tmp_path / "x.png", 50, 40))
    ids = processor(text=["USER: <image>\nHi ASSISTANT:"], images=[image], return_tensors="pt")["input_ids"][0]
    # 32 px / patch 8 = 16 patch features (CLS dropped by the "default" strategy): 16 <image> tokens
    assert int((ids == processor.tokenizer.convert_tokens_to_ids("<image>")).sum()) == 16
    assert ids[0] == processor.tokenizer.bos_token_id
    assert build_tiny_llava(tiny_llava, ["other corpus"], seed=1) == tiny_llava  # complete folder: kept


def test_run_stage_through_the_store_then_hits_the_cache(tiny_llava, tmp_path):
    from leccr.config import parse_config
    from leccr.core.execute import run_stage

    dataset = make_dataset(tmp_path / "dataset", n_images=2, n_videos=1, broken=False)
    cfg = parse_config({
        "name": "t", "artifacts_root": str(tmp_path / "artifacts"),
        "dataset": {"format": "multi30k", "path": str(dataset.path)},
        "describe": {"model": str(tiny_llava), "image_views": TWO_VIEWS, "num_frames": 2, "max_tokens": 4,
                     "dtype": "float32"},
    })
    first = run_stage(cfg, "describe", {"dataset": dataset})
    assert not first.cache_hit and first.rows["part-00000.parquet"] == 2 * 2 + 4
    manifest = first.artifact.manifest
    assert manifest.summary["descriptions"] == 8 and manifest.summary["engine"] == "transformers"
    # the model folder enters the key by content, not by where it lies
    # (and by its name, which its rows record)
    assert manifest.key_config["model"] == {"content": manifest.key_config["model"]["content"], "name": tiny_llava.name}
    assert len(manifest.key_config["model"]["content"]) == 64
    again = run_stage(cfg, "describe", {"dataset": dataset})
    assert again.cache_hit and again.artifact.key == first.artifact.key


def test_native_video_input_through_a_tiny_onevision(tmp_path_factory, tmp_path):
    """video_input: video — a video is one <video> input (LLaVA-OneVision, LLaVA-NeXT-Video, Qwen2-VL)."""
    from leccr.tiny_models.mllm import build_tiny_llava_onevision

    model = build_tiny_llava_onevision(tmp_path_factory.getbasetemp() / "tiny_onevision", CORPUS, seed=0)
    dataset = make_dataset(tmp_path / "dataset", n_images=1, n_videos=1, broken=False)
    cfg = small_config(model, video_input="video", num_frames=4, image_views={"scene": "Where is this?"})
    ctx = make_context(cfg, dataset, tmp_path / "out")
    describe.run(ctx)
    rows = read_table(sorted(ctx.out_dir.glob("part-*.parquet")), DESCRIPTIONS).to_pylist()
    assert sorted((r["item_id"], r["view_id"]) for r in rows) == [("img0", "scene"), ("vid0", "actions")]

    engine = describe.make_engine(cfg)  # the stage's engine, from the per-process cache
    frames = sample_frames(dataset.path / "media" / "vid0.mp4", num_frames=4)
    request = Request("vid0", "actions", "What happens?", frames, "video", 0)
    assert chat_prompt(engine.processor, request, "video") == "USER: <video>\nWhat happens? ASSISTANT:"
    inputs = engine._inputs([request])
    assert tuple(inputs["pixel_values_videos"].shape) == (1, 4, 3, 32, 32)  # (videos, frames, C, H, W)
    # 4 frames x (16 patches pooled 2x2 = 4 tokens) + 1 newline token
    video_tokens = int((inputs["input_ids"] == engine.model.config.video_token_index).sum())
    assert video_tokens == 4 * 4 + 1
    assert [r["description"] for r in rows if r["item_id"] == "vid0"] == [engine.generate([request])[0].text]
