"""Loading images and sampling video frames, with decoding in background threads.

Images are read with PIL; videos with decord's `VideoReader`, which seeks and decodes only the frames
asked for (`get_batch`), instead of decoding every frame of the file. Unreadable, empty or missing
files raise `MediaError(path, reason)`, so a stage can write the item to `errors.parquet` and go on.

`ShardPrefetcher` decodes the next shard in background threads while the current one is computed,
so a model (an MLLM in `describe`, a vision encoder in `visual`) never waits on disk or decoding.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from PIL import Image, UnidentifiedImageError

from leccr.core.failures import ItemError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class MediaError(Exception):
    """An image or video that cannot be used: missing, unreadable, or without frames."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def item_error(self, item: Mapping) -> ItemError:
        """The error row of `item` (an items.parquet row) whose media this is. Retryable: the file may be
        fixed or mounted again, and a rerun retries the item."""
        return ItemError(
            item["item_id"], f"{item['media_type']} {self.path}: {self.reason}", retryable=True, file=item["path"]
        )


def _check_file(path: Path) -> None:
    if not path.exists():
        raise MediaError(path, "file not found")
    if not path.is_file():
        raise MediaError(path, "not a file")
    if path.stat().st_size == 0:
        raise MediaError(path, "file is empty (0 bytes)")


def _shrink(image: Image.Image, max_side: int | None) -> Image.Image:
    """Downscale so the longer side is at most `max_side` (keeps aspect ratio; never upscales)."""
    if max_side is None or max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def load_image(path: str | Path, max_side: int | None = None) -> Image.Image:
    """An RGB PIL image, fully decoded (so the file is closed and errors surface here, not later)."""
    path = Path(path)
    _check_file(path)
    try:
        with Image.open(path) as handle:
            image = handle.convert("RGB")  # convert() forces the full decode
    except UnidentifiedImageError:
        raise MediaError(path, "not a readable image (unknown or corrupt format)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise MediaError(path, f"cannot decode image: {error}") from None
    if image.width == 0 or image.height == 0:
        raise MediaError(path, f"image has no pixels ({image.width}x{image.height})")
    return _shrink(image, max_side)


def frame_indices(
    total: int, num_frames: int | None = None, fps: float | None = None, video_fps: float | None = None
) -> list[int]:
    """Indices of the frames to sample from a video of `total` frames.

    - `num_frames` only: N frames spread uniformly, each the middle of one of N equal segments
      (index floor((i + 0.5) * total / N)); a video shorter than N frames repeats frames, so every
      item gets exactly N.
    - `fps`: one frame every 1/fps seconds from t=0 (index floor(t * video_fps)); with `num_frames`
      too, at most `num_frames` of those, spread uniformly over them.
    """
    if total < 1:
        raise ValueError(f"a video needs at least one frame, got total={total}")
    if fps is not None:
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        if not video_fps or video_fps <= 0:
            raise ValueError(f"sampling at fps={fps} needs the video's own frame rate, got {video_fps}")
        duration = total / video_fps
        count = max(1, math.ceil(duration * fps - 1e-9))
        indices = [min(total - 1, int(k / fps * video_fps + 1e-9)) for k in range(count)]
        if num_frames is not None and len(indices) > num_frames:
            indices = [indices[i] for i in frame_indices(len(indices), num_frames)]
        return indices
    if num_frames is None:
        raise ValueError("frame sampling needs num_frames or fps")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return [int((i + 0.5) * total / num_frames) for i in range(num_frames)]


def sample_frames(
    path: str | Path, num_frames: int | None = None, fps: float | None = None, max_side: int | None = None
) -> list[Image.Image]:
    """RGB frames sampled from a video with decord (see `frame_indices` for which frames)."""
    import decord

    path = Path(path)
    _check_file(path)
    try:
        # One decoding thread per reader: the parallelism comes from decoding several files at once.
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    except (RuntimeError, decord.DECORDError) as error:
        raise MediaError(path, f"cannot open video: {str(error).splitlines()[0]}") from None
    total = len(reader)
    if total == 0:
        raise MediaError(path, "video has no frames")
    indices = frame_indices(total, num_frames, fps, reader.get_avg_fps() if fps is not None else None)
    try:
        frames = reader.get_batch(indices).asnumpy()  # (T, H, W, 3) uint8
    except (RuntimeError, decord.DECORDError) as error:
        # decord 0.6.0 fails to copy out frames of some widths (e.g. 48 px: "DECORDArrayCopyFromTo:
        # The size must exactly match") on files FFmpeg decodes fine; decode those with PyAV instead.
        log.debug("%s: decord could not decode frames (%s); decoding with PyAV", path, str(error).splitlines()[0])
        frames = _decode_with_pyav(path, indices)
    if frames.ndim != 4 or frames.shape[0] != len(indices) or frames.shape[1] == 0 or frames.shape[2] == 0:
        raise MediaError(path, f"decoded frames have shape {frames.shape}, expected ({len(indices)}, H, W, 3)")
    return [_shrink(Image.fromarray(frame), max_side) for frame in frames]


def _decode_with_pyav(path: Path, indices: list[int]):
    """Frames `indices` (in decode order) of a video, decoding it front to back with PyAV: (T, H, W, 3)."""
    import av
    import numpy as np

    wanted = set(indices)
    found: dict[int, object] = {}
    try:
        with av.open(str(path)) as container:
            for number, frame in enumerate(container.decode(video=0)):
                if number in wanted:
                    found[number] = frame.to_ndarray(format="rgb24")
                if number >= max(wanted):
                    break
    except (av.FFmpegError, OSError, ValueError) as error:
        raise MediaError(path, f"cannot decode frames {indices[:3]}...: {error}") from None
    if not found:
        raise MediaError(path, "no frame could be decoded")
    # Frames are decoded from the first on, so only indices past the end of a short stream are
    # missing: those repeat the last decoded frame.
    last = max(found)
    return np.stack([found.get(i, found[last]) for i in indices])


def load_visual(
    path: str | Path | None,
    media_type: str,
    num_frames: int | None = None,
    fps: float | None = None,
    max_side: int | None = None,
) -> list[Image.Image]:
    """The frames of one item: one image for `image`, the sampled frames for `video`."""
    if path is None:
        raise MediaError("<no path>", f"item has no media path (media_type {media_type})")
    if media_type == "image":
        return [load_image(path, max_side)]
    if media_type == "video":
        return sample_frames(path, num_frames, fps, max_side)
    raise MediaError(path, f"unknown media_type {media_type!r} (expected 'image' or 'video')")


@dataclass(frozen=True)
class ItemLoader:
    """Loads an item's frames from its items.parquet row (`path` resolved against `dataset_root`)."""

    dataset_root: str | Path | None
    num_frames: int | None = None
    fps: float | None = None
    max_side: int | None = None

    def __call__(self, item: dict) -> list[Image.Image]:
        from leccr.media.paths import resolve_media_path

        return load_visual(
            resolve_media_path(self.dataset_root, item["path"]),
            item["media_type"],
            self.num_frames,
            self.fps,
            self.max_side,
        )


def _load_or_error(load: Callable[[T], R], item: T) -> R | MediaError:
    try:
        return load(item)
    except MediaError as error:  # data, not a crash: the caller records it per item
        return error


class ShardPrefetcher:
    """Decodes the media of shard k+1 in background threads while shard k is being generated.

    `take(index)` returns shard `index`'s loaded items (in order) and starts decoding the next shard
    this process will compute (`next_index(index)`), so by the time the engine is done the next
    shard's frames are mostly ready. Use as a context manager; it owns a thread pool.
    """

    def __init__(
        self,
        shards: Sequence[Sequence[T]],
        load: Callable[[T], R],
        workers: int = 2,
        next_index: Callable[[int], int | None] | None = None,
    ):
        if workers < 1:
            raise ValueError(f"ShardPrefetcher needs workers >= 1, got {workers}")
        self.shards = shards
        self.load = load
        self.next_index = next_index or (lambda index: index + 1)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="leccr-decode")
        self._pending: dict[int, list[Future]] = {}
        self.wait_seconds = 0.0  # time `take` spent blocked on decoding: near 0 when prefetching keeps up

    def _schedule(self, index: int | None) -> None:
        if index is None or not 0 <= index < len(self.shards) or index in self._pending:
            return
        self._pending[index] = [self._pool.submit(_load_or_error, self.load, item) for item in self.shards[index]]

    def take(self, index: int, items: Sequence[T] | None = None) -> list[tuple[T, R | MediaError]]:
        """Shard `index`'s loaded items. `items`: a subset of that shard (the failed items a rerun
        retries) — loaded now, in this thread, instead of the whole prefetched shard."""
        import time

        if items is not None and len(items) != len(self.shards[index]):
            for future in self._pending.pop(index, []):
                future.cancel()
            return [(item, _load_or_error(self.load, item)) for item in items]
        self._schedule(index)
        self._schedule(self.next_index(index))
        futures = self._pending.pop(index)
        # Shards scheduled but never taken (they were committed by an earlier run) are dropped.
        for stale in [i for i in self._pending if i < index]:
            for future in self._pending.pop(stale):
                future.cancel()
        started = time.perf_counter()
        results = [future.result() for future in futures]
        self.wait_seconds += time.perf_counter() - started
        return list(zip(self.shards[index], results))

    def close(self) -> None:
        for futures in self._pending.values():
            for future in futures:
                future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ShardPrefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
