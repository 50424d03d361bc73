"""Bad items of any stage: one row per item that could not be processed, with the reason.

One schema for every stage. `file` and `line` say where a dataset problem is (a caption file and its
1-based line); for a media error, `file` is the item's path as items.parquet stores it. `retryable`
marks failures that may go away without a new input (a missing or unreadable media file, an engine
error): a rerun retries those items, and only those, once their file has changed (see leccr/core/failures.py).
"""
import pyarrow as pa

from leccr.schemas.core import VOLATILE

ERRORS = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),  # item or caption id; "" when a line names none
        pa.field("stage", pa.string(), nullable=False),
        pa.field("shard", pa.int32(), nullable=False),  # -1 for stages without shards (dataset)
        pa.field("reason", pa.string(), nullable=False),
        pa.field("file", pa.string()),
        pa.field("line", pa.int32()),
        pa.field("retryable", pa.bool_(), nullable=False),
        # The media file's state when the item failed ("size:mtime_ns:inode", or "missing"): a rerun
        # retries the item once the file differs from this (restored, fixed, mounted again).
        # Volatile: an inode and an mtime differ between machines and copies, so not in the content digest.
        pa.field("file_state", pa.string(), metadata=VOLATILE),
    ]
)
