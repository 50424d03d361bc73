"""The `evaluate` stage: retrieval metrics and the error-analysis rows behind the report.

    evaluate/<key>/metrics.parquet       one row per (method, score, lang, direction, metric, k)
    evaluate/<key>/worst_queries.parquet the worst-ranked queries with their top retrieved items
    evaluate/<key>/report.md, plots/*.png

DuckDB: `SELECT * FROM metrics WHERE lang = 'de' AND metric = 'recall'`.
"""
import pyarrow as pa

DIRECTIONS = ("text_to_visual", "visual_to_text")

# Metric names: recall (k = 1, 5, 10, ...: % of queries whose first hit ranks within k), sumr (the six
# R@1/5/10 of both directions summed; direction "both", k null), mean_rank / median_rank (rank of the
# first hit, 1-based; k null).
METRICS = pa.schema(
    [
        pa.field("method", pa.string(), nullable=False),  # baseline | leccr | cl2cm | zero-shot name
        # fused (the method's inference score) | global | alpha (the fused score at an evaluate.alphas weight)
    pa.field("score", pa.string(), nullable=False),
        pa.field("lang", pa.string(), nullable=False),  # language of the text queries / gallery
        pa.field("direction", pa.string(), nullable=False),  # text_to_visual | visual_to_text | both
        pa.field("metric", pa.string(), nullable=False),  # recall | sumr | mean_rank | median_rank
        pa.field("k", pa.int32()),  # K of recall@K; null for the other metrics
        pa.field("value", pa.float64(), nullable=False),  # recall in %, ranks 1-based
        pa.field("name", pa.string(), nullable=False),  # e.g. de/text_to_visual_R@1 (open_clip style)
        pa.field("split", pa.string(), nullable=False),  # dataset split evaluated (test, test_1k, ...)
        pa.field("n_texts", pa.int32(), nullable=False),  # captions of this language in the split
        pa.field("n_items", pa.int32(), nullable=False),  # visual items in the gallery
        pa.field("alpha", pa.float64(), nullable=False),  # weight of minmax(global) in the score (1 = global only)
        pa.field("checkpoint", pa.string(), nullable=False),  # train artifact key (or zero-shot encoders' fingerprint)
    ]
)

# The worst-ranked queries (largest rank of the first hit) of each method, language and direction.
WORST_QUERIES = pa.schema(
    [
        pa.field("method", pa.string(), nullable=False),
        pa.field("score", pa.string(), nullable=False),
        pa.field("lang", pa.string(), nullable=False),
        pa.field("direction", pa.string(), nullable=False),
        pa.field("query_id", pa.string(), nullable=False),  # caption_id (text_to_visual) or item_id
        pa.field("query_text", pa.string(), nullable=False),  # the caption, or the item's description
        pa.field("rank", pa.int64(), nullable=False),  # 1-based rank of the first hit
        pa.field("expected", pa.list_(pa.string()), nullable=False),  # ids that would be hits
        pa.field("retrieved_ids", pa.list_(pa.string()), nullable=False),  # top retrieved, best first
        pa.field("retrieved_texts", pa.list_(pa.string()), nullable=False),  # their captions / descriptions
        pa.field("retrieved_scores", pa.list_(pa.float64()), nullable=False),
    ]
)
