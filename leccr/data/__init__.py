"""Readers over a features artifact: memory-mapped Arrow tables, a training Dataset, evaluation loaders."""

from leccr.data.reader import (  # noqa: F401
    EvalCaptions,
    EvalItems,
    FeatureCollate,
    TrainingDataset,
    load_eval_captions,
    load_eval_items,
    query_caption_kind,
)
from leccr.data.tables import FeatureTables  # noqa: F401
