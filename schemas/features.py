"""The `features` stage: three sub-tables of one artifact, each a folder of `part-*.parquet` shards.

    features/<key>/visual/part-*.parquet        one row per visual item         (DuckDB view visual_features)
    features/<key>/text/part-*.parquet          one row per caption             (DuckDB view text_tokens)
    features/<key>/descriptions/part-*.parquet  one row per described item      (DuckDB view description_features)
    features/<key>/descriptions/empty.parquet   one row: the encoding of an empty description
    features/<key>/features_info.json           tokenizer ids (pad/cls/sep), widths, layouts, visual cache key

Layouts of the array columns (all row-major, C order):

- `visual.features` holds one item's visual tokens `[n_tokens, dim]` flattened to `n_tokens * dim`
  values. When every item has the same shape (images through a vision model: patch tokens + [CLS], or
  one pooled vector) the column is `fixed_size_list<float32|float16>[n_tokens * dim]` — DuckDB shows
  `FLOAT[2176]`, a reader reshapes the whole column at once. When shapes vary (videos sampled by fps,
  imported pre-extracted features) it is `list<float32|float16>`; `n_tokens` and `dim` always say the
  shape. A video's tokens are its frames' tokens in frame order (pooled: one token per frame).
- `text.input_ids` / `descriptions.input_ids` hold the *unpadded* token ids (`list<int32>`, special
  tokens included, truncated to the configured max length); `n_tokens` is their length. The attention
  mask of a stored sequence is all ones over its `n_tokens` positions, so it is not stored: readers pad
  a batch and build the mask `arange(L) < n_tokens`.
- `descriptions.states` (only when description states are cached) holds the frozen text encoder's
  last hidden states `[n_tokens, dim]` flattened (`list<float32|float16>`), one per stored token.
"""
from __future__ import annotations

import pyarrow as pa

VALUE_TYPES = {"float32": pa.float32(), "float16": pa.float16()}


def value_type(name: str) -> pa.DataType:
    if name not in VALUE_TYPES:
        raise ValueError(f"unknown feature dtype {name!r}; expected one of {sorted(VALUE_TYPES)}")
    return VALUE_TYPES[name]


# Schema metadata of a fixed-size `visual/` shard: every row's `n_tokens,dim`. The width lives in the
# schema, so any shard tells it — one whose items all failed (no rows) included.
VISUAL_SHAPE = b"leccr.visual_shape"


def visual_schema(dtype: str = "float32", list_size: int | None = None,
                  shape: tuple[int, int] | None = None) -> pa.Schema:
    """Schema of `visual/`: fixed-size features when `list_size` (= n_tokens * dim) is given, else variable.
    `shape` (n_tokens, dim) of every row, for the fixed layout, goes into the schema's metadata."""
    values = value_type(dtype)
    features = pa.list_(values, list_size) if list_size is not None else pa.list_(values)
    if shape is not None and (list_size is None or shape[0] * shape[1] != list_size):
        raise ValueError(f"visual shape {shape} does not fill fixed-size rows of {list_size} values")
    metadata = {VISUAL_SHAPE: f"{shape[0]},{shape[1]}".encode()} if shape is not None else None
    return pa.schema(
        [
            pa.field("item_id", pa.string(), nullable=False),
            pa.field("split", pa.string(), nullable=False),
            pa.field("media_type", pa.string(), nullable=False),  # image | video
            pa.field("n_tokens", pa.int32(), nullable=False),  # visual tokens (patches + [CLS], frames, ...)
            pa.field("dim", pa.int32(), nullable=False),  # width of one token
            pa.field("features", features, nullable=False),  # [n_tokens, dim] row-major
        ],
        metadata=metadata,
    )


def visual_shape(schema: pa.Schema) -> tuple[int, int] | None:
    """(n_tokens, dim) of every row of a fixed-size visual shard, from its schema; None for the variable
    layout (or a shard written before the shape was recorded)."""
    value = (schema.metadata or {}).get(VISUAL_SHAPE)
    if value is None:
        return None
    n_tokens, dim = (int(part) for part in value.decode().split(","))
    return n_tokens, dim


# One row per caption: the dataset's captions (English and human target-language ones, and shipped MT
# when the translate artifact has no translation for that caption and language) and every translation
# of the translate artifact. (caption_id, lang, kind) is unique.
TEXT_TOKENS = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("caption_id", pa.string(), nullable=False),  # an MT row carries its English caption's id
        pa.field("split", pa.string(), nullable=False),
        pa.field("lang", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),  # human | mt
        pa.field("source", pa.string(), nullable=False),  # dataset | translate
        pa.field("n_tokens", pa.int32(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
    ]
)


def description_schema(states_dtype: str | None = None) -> pa.Schema:
    """Schema of `descriptions/`: token ids, plus the frozen encoder's token states when `states_dtype` is set."""
    fields = [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("views", pa.list_(pa.string()), nullable=False),  # view ids joined into this row, in order
        pa.field("n_tokens", pa.int32(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
    ]
    if states_dtype is not None:
        fields += [
            pa.field("dim", pa.int32(), nullable=False),
            pa.field("states", pa.list_(value_type(states_dtype)), nullable=False),  # [n_tokens, dim]
        ]
    return pa.schema(fields)
