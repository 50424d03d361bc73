"""Image loading and video frame sampling on real files: PNGs written with PIL, mp4s encoded with
PyAV (libx264) and decoded with decord."""
import threading
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from leccr.media.decode import (ItemLoader, MediaError, ShardPrefetcher, frame_indices, load_image, load_visual,
                         sample_frames)

GRAY_STEP = 7  # frame i of a test video is a flat gray of level i * GRAY_STEP


def write_mp4(path: Path, num_frames: int = 32, size: int = 64, fps: int = 8, noise_seed: int | None = None) -> Path:
    """An H.264 mp4 whose frame i is flat gray i*GRAY_STEP (or random noise when noise_seed is set)."""
    rng = np.random.RandomState(noise_seed) if noise_seed is not None else None
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for index in range(num_frames):
            if rng is None:
                pixels = np.full((size, size, 3), index * GRAY_STEP, np.uint8)
            else:
                pixels = rng.randint(0, 256, (size, size, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_png(path: Path, width: int = 40, height: int = 30, seed: int = 0, mode: str = "RGB") -> Path:
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def write_corrupt_mp4(path: Path) -> Path:
    """The first bytes of a real mp4 followed by garbage: the container header cannot be parsed."""
    good = write_mp4(path.with_name("source-for-corrupt.mp4"), num_frames=4)
    path.write_bytes(good.read_bytes()[:48] + b"not a video " * 64)
    return path


def gray_level(frame: Image.Image) -> float:
    return float(np.asarray(frame).mean())


# ------------------------------------------------------------------------------- frame indices
def test_uniform_indices_are_segment_midpoints():
    # floor((i + 0.5) * 32 / 4) for i = 0..3
    assert frame_indices(32, num_frames=4) == [4, 12, 20, 28]
    assert frame_indices(10, num_frames=1) == [5]
    # a video shorter than N repeats frames so every item gets exactly N: floor((i + .5) * 5 / 8)
    assert frame_indices(5, num_frames=8) == [0, 0, 1, 2, 2, 3, 4, 4]


def test_fps_indices_step_through_time_and_respect_the_cap():
    # 32 frames at 8 fps = 4 s; one frame per second: t = 0, 1, 2, 3 -> frames 0, 8, 16, 24
    assert frame_indices(32, fps=1, video_fps=8) == [0, 8, 16, 24]
    assert frame_indices(32, fps=2, video_fps=8) == [0, 4, 8, 12, 16, 20, 24, 28]
    # capped at 2 of those 4, spread uniformly over them: positions [1, 3] -> frames 8, 24
    assert frame_indices(32, num_frames=2, fps=1, video_fps=8) == [8, 24]
    # a clip shorter than one step still gives its first frame
    assert frame_indices(3, fps=0.5, video_fps=30) == [0]


def test_frame_indices_reject_bad_arguments():
    with pytest.raises(ValueError, match="num_frames or fps"):
        frame_indices(10)
    with pytest.raises(ValueError, match="at least one frame"):
        frame_indices(0, num_frames=2)
    with pytest.raises(ValueError, match="frame rate"):
        frame_indices(10, fps=1)


# ------------------------------------------------------------------------------- videos
def test_sample_frames_decodes_the_frames_it_names(tmp_path):
    video = write_mp4(tmp_path / "gray.mp4")
    frames = sample_frames(video, num_frames=4)
    assert [f.size for f in frames] == [(64, 64)] * 4 and all(f.mode == "RGB" for f in frames)
    # frames 4, 12, 20, 28 are flat grays 28, 84, 140, 196 (x264 keeps a flat frame within a few levels)
    expected = [i * GRAY_STEP for i in (4, 12, 20, 28)]
    assert [gray_level(f) for f in frames] == pytest.approx(expected, abs=3)


def test_sample_frames_at_fixed_fps(tmp_path):
    video = write_mp4(tmp_path / "gray.mp4", num_frames=32, fps=8)
    frames = sample_frames(video, fps=1)
    assert [gray_level(f) for f in frames] == pytest.approx([i * GRAY_STEP for i in (0, 8, 16, 24)], abs=3)


def test_sample_frames_falls_back_to_pyav_where_decord_cannot_copy_frames(tmp_path):
    # decord 0.6.0 opens a 48-px-wide H.264 file but fails to copy its frames out; PyAV decodes it.
    video = write_mp4(tmp_path / "narrow.mp4", num_frames=16, size=48)
    frames = sample_frames(video, num_frames=2)
    assert [f.size for f in frames] == [(48, 48)] * 2
    assert [gray_level(f) for f in frames] == pytest.approx([4 * GRAY_STEP, 12 * GRAY_STEP], abs=3)


def test_sample_frames_shrinks_to_max_side(tmp_path):
    video = write_mp4(tmp_path / "gray.mp4", num_frames=8)
    assert [f.size for f in sample_frames(video, num_frames=2, max_side=32)] == [(32, 32)] * 2


@pytest.mark.parametrize("case, reason", [("missing", "file not found"), ("empty", "empty"),
                                          ("corrupt", "cannot open video")])
def test_unusable_videos_raise_media_error_with_the_reason(tmp_path, case, reason):
    path = tmp_path / f"{case}.mp4"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "corrupt":
        write_corrupt_mp4(path)
    with pytest.raises(MediaError, match=reason) as caught:
        sample_frames(path, num_frames=4)
    assert caught.value.path == str(path) and reason in caught.value.reason


# ------------------------------------------------------------------------------- images
def test_load_image_converts_to_rgb_and_shrinks(tmp_path):
    rgba = write_png(tmp_path / "a.png", 40, 30, mode="RGBA")
    image = load_image(rgba)
    assert image.mode == "RGB" and image.size == (40, 30)
    assert load_image(rgba, max_side=20).size == (20, 15)  # aspect kept: 40x30 -> 20x15
    assert load_image(rgba, max_side=100).size == (40, 30)  # never upscaled


def test_unusable_images_raise_media_error(tmp_path):
    not_an_image = tmp_path / "text.png"
    not_an_image.write_text("hello")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(write_png(tmp_path / "full.png", 64, 64).read_bytes()[:100])
    with pytest.raises(MediaError, match="not a readable image"):
        load_image(not_an_image)
    with pytest.raises(MediaError, match="cannot decode image"):
        load_image(truncated)
    with pytest.raises(MediaError, match="file not found"):
        load_image(tmp_path / "nope.png")


def test_load_visual_dispatches_on_media_type(tmp_path):
    assert len(load_visual(write_png(tmp_path / "a.png"), "image", num_frames=4)) == 1
    assert len(load_visual(write_mp4(tmp_path / "v.mp4", num_frames=8), "video", num_frames=3)) == 3
    with pytest.raises(MediaError, match="unknown media_type 'audio'"):
        load_visual(tmp_path / "a.png", "audio")
    with pytest.raises(MediaError, match="no media path"):
        load_visual(None, "image")


# ------------------------------------------------------------------------------- background decoding
def test_shard_prefetcher_keeps_order_runs_in_threads_and_returns_media_errors(tmp_path):
    paths = [write_png(tmp_path / f"{i}.png", seed=i) for i in range(5)]
    paths.insert(2, tmp_path / "missing.png")
    threads = []

    def load(path):
        threads.append(threading.current_thread().name)
        return load_image(path)

    with ShardPrefetcher([paths[:3], paths[3:]], load, workers=2) as prefetcher:
        results = prefetcher.take(0) + prefetcher.take(1)
    assert [item for item, _ in results] == paths
    assert isinstance(results[2][1], MediaError) and results[2][1].reason == "file not found"
    assert all(isinstance(r, Image.Image) for i, (_, r) in enumerate(results) if i != 2)
    assert threads and all(name.startswith("leccr-decode") for name in threads)


def test_shard_prefetcher_propagates_other_errors():
    def load(item):
        raise KeyError(item)

    with ShardPrefetcher([[1, 2]], load) as prefetcher, pytest.raises(KeyError):
        prefetcher.take(0)


def test_item_loader_resolves_stored_paths_against_the_dataset_root(tmp_path):
    write_png(tmp_path / "a.png", seed=1)
    write_mp4(tmp_path / "v.mp4", num_frames=12)
    load = ItemLoader(str(tmp_path), num_frames=3)
    assert np.asarray(load({"path": "a.png", "media_type": "image"})[0]).tolist() == \
        np.asarray(load_image(tmp_path / "a.png")).tolist()
    assert len(load({"path": str(tmp_path / "v.mp4"), "media_type": "video"})) == 3  # absolute: kept
    with pytest.raises(MediaError, match="file not found"):
        load({"path": "gone.png", "media_type": "image"})


def test_shard_prefetcher_decodes_the_next_shard_before_it_is_asked_for(tmp_path):
    shards = [[write_png(tmp_path / f"{s}{i}.png", seed=i) for i in range(2)] for s in "abc"]
    second_shard_loaded = threading.Event()

    def load(path):
        if path in shards[1]:
            second_shard_loaded.set()
        return load_image(path)

    with ShardPrefetcher(shards, load, workers=2) as prefetcher:
        first = prefetcher.take(0)
        assert [p for p, _ in first] == shards[0]
        # take(0) already queued shard 1: it gets decoded without anyone asking for it
        assert second_shard_loaded.wait(timeout=30)
        assert [p for p, _ in prefetcher.take(1)] == shards[1]
        # shards may be taken out of order (resumed runs skip committed shards)
        assert [p for p, _ in prefetcher.take(2)] == shards[2]
