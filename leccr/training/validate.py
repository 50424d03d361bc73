"""Per-epoch validation: SumR per target language on the validation split, with the model's own
inference score (fused with its `score_alpha`; global only without slots).

Queries per language are the split's human captions in that language when it has any, else its
machine translations (most CCR releases ship MT captions for validation, references for test only).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from leccr.data import EvalCaptions, EvalItems, FeatureTables, load_eval_captions, load_eval_items
from leccr.metrics import chunked_retrieval_metrics, matrix_score_block
from leccr.models.encode import encode_items, encode_texts


def _caption_kind(tables: FeatureTables, lang: str, split: str) -> str:
    import pyarrow.compute as pc

    text = tables.text
    rows = pc.and_(pc.equal(text.column("split"), split), pc.equal(text.column("lang"), lang))
    kinds = set(text.column("kind").filter(rows).to_pylist())
    return "human" if "human" in kinds or not kinds else "mt"


@dataclass
class ValidationSet:
    split: str
    items: EvalItems
    captions: dict[str, EvalCaptions]

    @classmethod
    def load(cls, features: str | Path | FeatureTables, split: str, languages: list[str], use_states: bool
             ) -> ValidationSet:
        tables = features if isinstance(features, FeatureTables) else FeatureTables.open(features)
        try:
            items = load_eval_items(tables, split, use_states=use_states)
            captions = {lang: load_eval_captions(tables, lang, items, split, kind=_caption_kind(tables, lang, split))
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
