"""Bad items of any stage: one row per item that could not be processed, with the reason."""
import pyarrow as pa

ERRORS = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("shard", pa.int32(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
    ]
)
