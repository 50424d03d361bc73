"""The `dataset` stage: a dataset folder read through its adapter into two tables."""
import pyarrow as pa

# One row per visual item (image or video).
ITEMS = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),  # train | val | test (adapters may add test_1k, ...)
        pa.field("media_type", pa.string(), nullable=False),  # image | video
        # image/video file, relative to the dataset root (absolute if outside it); null when only features exist
        pa.field("path", pa.string()),
        pa.field("feature_path", pa.string()),  # pre-extracted features (relative like `path`), if the release has them
    ]
)

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
