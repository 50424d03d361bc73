"""Per-epoch validation: SumR per target language on the validation split, with the model's own
inference score (fused with its `score_alpha`; global only without slots).

Queries per language follow `leccr.data.query_caption_kind`, the rule evaluate scores with, so the
best checkpoint is picked on the kind of queries it is scored on.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from leccr.data import (EvalCaptions, EvalItems, FeatureTables, load_eval_captions, load_eval_items,
                        query_caption_kind)
from leccr.evaluation.metrics import chunked_retrieval_metrics, matrix_score_block
from leccr.models.encode import encode_items, encode_texts


@dataclass
class ValidationSet:
    split: str
    items: EvalItems
    captions: dict[str, EvalCaptions]

    @classmethod
    def load(cls, features: str | Path | FeatureTables, split: str, languages: list[str], use_states: bool,
             caption_kind: str = "auto") -> ValidationSet:
        tables = features if isinstance(features, FeatureTables) else FeatureTables.open(features)
        try:
            items = load_eval_items(tables, split, use_states=use_states)
            captions = {lang: load_eval_captions(tables, lang, items, split,
                                                 kind=query_caption_kind(tables, lang, split, caption_kind))
                        for lang in languages}
        except ValueError as error:
            raise ValueError(f"validation split {split!r}: {error} (set train.val_split to another split, "
                             "or null to keep the last epoch)") from None
        return cls(split, items, captions)

    @torch.no_grad()
    def evaluate(self, model, batch_size: int, device: torch.device) -> dict[str, float]:
        """{"val_sumr": mean over languages, "val_sumr_<lang>": ...}; leaves the model in eval mode."""
        model.eval()
        visual_global, visual_slots = encode_items(model, self.items, batch_size, device)
        alpha = float(model.config.score_alpha) if visual_slots is not None else 1.0
        scores: dict[str, float] = {}
        for lang, captions in self.captions.items():
            text = encode_texts(model, captions.ids, captions.mask, batch_size, device)
            matrix = model.score(text, visual_global, visual_slots, alpha)
            metrics = chunked_retrieval_metrics(matrix_score_block(matrix), captions.item_index,
                                                len(self.items.item_ids))
            scores[f"val_sumr_{lang}"] = float(metrics["sumr"])
        scores["val_sumr"] = sum(scores.values()) / len(scores)
        return scores
