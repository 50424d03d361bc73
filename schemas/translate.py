"""The `translate` stage: English captions and their target-language (pseudo-parallel) versions."""
import pyarrow as pa

TRANSLATIONS = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("caption_id", pa.string(), nullable=False),  # id of the English caption translated
        pa.field("lang", pa.string(), nullable=False),  # target language
        pa.field("text", pa.string(), nullable=False),  # the translation
        pa.field("source_text", pa.string(), nullable=False),  # the English caption
        pa.field("engine", pa.string(), nullable=False),  # transformers | import
        pa.field("model", pa.string()),  # model name (transformers), the file's name (import), or "dataset"
        pa.field("model_digest", pa.string()),  # content digest of that model or file (null for "dataset")
    ]
)
