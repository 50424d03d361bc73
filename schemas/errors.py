"""Bad items of any stage: one row per item that could not be processed, with the reason.

One schema for every stage. `file` and `line` say where a dataset problem is (a caption file and its
1-based line); shard stages leave them null. `retryable` marks failures that may go away on their
own (a missing or unreadable media file, an engine error): a rerun retries those items, and only those.
"""
import pyarrow as pa

ERRORS = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),  # item or caption id; "" when a line names none
        pa.field("stage", pa.string(), nullable=False),
        pa.field("shard", pa.int32(), nullable=False),  # -1 for stages without shards (dataset)
        pa.field("reason", pa.string(), nullable=False),
        pa.field("file", pa.string()),
        pa.field("line", pa.int32()),
        pa.field("retryable", pa.bool_(), nullable=False),
    ]
)
