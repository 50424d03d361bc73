"""The `index` stage: what search reads.

    index/<key>/items.parquet               one row per indexed visual item: where its media is, what it shows
    index/<key>/<method>/embeddings.parquet  one row per item: the method's global embedding (+ slot embeddings)
    index/<key>/<method>/index.json          alpha, languages, max_length, the fused score's min/max, the ANN setup
    index/<key>/<method>/vectors.faiss       the FAISS index over `embedding` (only with index.ann set)

Row i of every method's embeddings.parquet is row i of items.parquet (the same item order).
`path` is relative to the dataset root (the dataset artifact's `path`), so a moved dataset still works.

DuckDB: `SELECT method, item_id, embedding[1] FROM "index" LIMIT 5`; `index_items` holds the captions.
"""
import pyarrow as pa

CAPTION = pa.struct([pa.field("lang", pa.string()), pa.field("kind", pa.string()), pa.field("text", pa.string())])

INDEX_ITEMS = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("media_type", pa.string(), nullable=False),  # image | video
        pa.field("path", pa.string()),  # relative to the dataset root; null when only features exist
        pa.field("captions", pa.list_(CAPTION), nullable=False),  # the dataset's captions, every language
        pa.field("description", pa.string()),  # the MLLM description(s), "[view] text ..."; null when none
        # Where the description comes from, as the describe artifact records it: its engine
        # (transformers | vllm | import) and model (folder or import file name); null without one.
        pa.field("description_engine", pa.string()),
        pa.field("description_model", pa.string()),
        # True when that model is one of leccr's tiny random-weight models (the demo's): its text is noise.
        pa.field("description_random_weights", pa.bool_()),
    ]
)


def embeddings_schema(embed_dim: int, slot_values: int | None) -> pa.Schema:
    """Global embeddings [E] and, for methods with slots, the slot embeddings flattened [N_q * E]."""
    fields = [
        pa.field("method", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("path", pa.string()),
        pa.field("embedding", pa.list_(pa.float32(), embed_dim), nullable=False),
    ]
    if slot_values is not None:
        fields.append(pa.field("slots", pa.list_(pa.float32(), slot_values), nullable=False))
    return pa.schema(fields)
