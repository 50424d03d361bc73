"""The `describe` stage: one MLLM description per visual item per view (prompt)."""
import pyarrow as pa

from leccr.schemas.core import VOLATILE

DESCRIPTIONS = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("view_id", pa.string(), nullable=False),  # e.g. objects | actions | scene | detailed
        pa.field("prompt", pa.string(), nullable=False),  # the user prompt sent with the image/frames ("" on import)
        pa.field("description", pa.string(), nullable=False),
        pa.field("n_tokens", pa.int32()),  # generated tokens (incl. the end-of-sequence token when emitted); null on import
        pa.field("engine", pa.string(), nullable=False),  # vllm | transformers | import
        pa.field("model", pa.string()),  # model folder's name or hub id; import: the file's "model", else its name
        pa.field("model_digest", pa.string()),  # content digest of the model folder (import: of the file)
        # JSON of what the key counts: temperature and max_tokens; top_p and the base seed when sampling
        pa.field("sampling", pa.string(), nullable=False),
        pa.field("seed", pa.int64()),  # the seed this row was sampled with (derived from base seed + ids); null
        # under greedy decoding (no random numbers drawn) and on import
        # engine wall time of the call, shared equally by its rows (volatile: not in the content digest)
        pa.field("seconds", pa.float64(), nullable=False, metadata=VOLATILE),
    ]
)
