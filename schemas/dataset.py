"""The `dataset` stage: a dataset folder read through its adapter into two tables."""
import pyarrow as pa

# One row per visual item (image or video), as a dataset adapter reads it.
SOURCE_ITEMS = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),  # train | val | test (adapters may add test_1k, ...)
        pa.field("media_type", pa.string(), nullable=False),  # image | video
        # image/video file, relative to the dataset root (absolute if outside it); null when only features exist
        pa.field("path", pa.string()),
        pa.field("feature_path", pa.string()),  # pre-extracted features (relative like `path`), if the release has them
    ]
)

# items.parquet of the dataset artifact: the adapter's row plus the content digest (BLAKE3) of each
# file it names. A per-item stage reuses an earlier row of an item whose digest is unchanged, so one
# replaced image costs one image (leccr.core.memo); the digests are also why editing a file in
# place changes downstream keys, although the paths stay the same.
ITEMS = pa.schema(list(SOURCE_ITEMS) + [
    pa.field("media_digest", pa.string()),  # digest of `path`'s bytes; null when there is no file
    pa.field("feature_digest", pa.string()),  # digest of `feature_path`'s bytes (a file or a folder)
])

# One row per caption. (caption_id, lang) is unique. A machine translation shipped with a dataset has
# kind "mt" and the caption_id of the English caption it translates.
CAPTIONS = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("caption_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("lang", pa.string(), nullable=False),  # ISO 639-1: en, de, fr, cs, ja, zh
        pa.field("text", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),  # human | mt
    ]
)
