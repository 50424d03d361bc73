"""The baseline: MT pseudo-pairs + global contrastive only (L_vs + L_vt + L_st).

The same encoders, pooling and projections as LECCR, with no description slots and no interaction.
"""
from __future__ import annotations

from torch import Tensor

from leccr.models.losses import Gather, id_aware_infonce
from leccr.models.base import RetrievalModel


class BaselineModel(RetrievalModel):
    """forward(batch) -> {visual_emb, en_emb, tgt_emb [B, E], item_index [B]}; losses: vs, vt, st, total."""

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        parts = self._global_embeddings(batch)
        return {
            "visual_emb": self.global_visual(parts["visual_tokens"], batch.get("visual_mask")),
            "en_emb": parts["en_emb"],
            "tgt_emb": parts["tgt_emb"],
            "item_index": batch["item_index"],
        }

    def compute_losses(self, outputs: dict[str, Tensor], gather: Gather | None = None) -> dict[str, Tensor]:
        g = self._gather_fn(gather)
        visual, en, tgt, index = (g(outputs[k]) for k in ("visual_emb", "en_emb", "tgt_emb", "item_index"))
        terms = {
            "vs": id_aware_infonce(visual, en, index, self.temperature),
            "vt": id_aware_infonce(visual, tgt, index, self.temperature),
            "st": id_aware_infonce(en, tgt, index, self.temperature),
        }
        terms["total"] = terms["vs"] + terms["vt"] + terms["st"]
        return terms
