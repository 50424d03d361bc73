"""CL2CM (AAAI 2024), as we reconstruct it: no code or equations are public (METHOD.md "CL2CM").

Two networks over the shared text encoder and the baseline's visual encoder:
- the cross-modal (CM) network: the baseline's heads (f_v, f_s, f_t), trained with L_vs + L_vt;
- the cross-lingual (CL) network: its own projection head on the text [CLS] (f^CL_s, f^CL_t) and its
  own learnable temperature, trained with sentence-level InfoNCE and word-level entropic OT between
  the English and translation token states;
and relational distillation of the CL network's English-vs-target similarity rows into the CM
network's visual-vs-target rows. Inference: the CM network's global score.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leccr.models.losses import Gather, id_aware_infonce, relational_distillation_loss, word_ot_loss
from leccr.models.base import RetrievalModel
from leccr.models.config import ModelConfig
from leccr.models.text_encoder import TextEncoder


class Cl2cmModel(RetrievalModel):
    """forward(batch) -> visual_emb, en_emb, tgt_emb, cl_en_emb, cl_tgt_emb [B, E], item_index [B],
    en_tokens [B, L, D_t], en_mask [B, L], tgt_tokens [B, L', D_t], tgt_mask [B, L'].
    losses: vs, vt, cl, ot, rd, total = vs + vt + cl + w_ot·ot + w_rd·rd.
    """

    def __init__(self, config: ModelConfig, text_encoder: TextEncoder) -> None:
        super().__init__(config, text_encoder)
        self.cl_text_proj = nn.Linear(text_encoder.width, config.embed_dim)
        self.cl_temperature = nn.Parameter(torch.tensor(float(config.temperature_init)))

    def _encode_both(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> (token states [B, L, D_t], CM embedding [B, E], CL embedding [B, E])."""
        states, cls_state = self.text_encoder(ids, mask)
        return (
            states,
            F.normalize(self.text_proj(cls_state), dim=-1),
            F.normalize(self.cl_text_proj(cls_state), dim=-1),
        )

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        visual_mask = batch.get("visual_mask")
        tokens = self.visual_tokens(batch["visual"], visual_mask)
        en_tokens, en_emb, cl_en_emb = self._encode_both(batch["en_ids"], batch["en_mask"])
        tgt_tokens, tgt_emb, cl_tgt_emb = self._encode_both(batch["tgt_ids"], batch["tgt_mask"])
        return {
            "visual_emb": self.global_visual(tokens, visual_mask),
            "en_emb": en_emb,
            "tgt_emb": tgt_emb,
            "cl_en_emb": cl_en_emb,
            "cl_tgt_emb": cl_tgt_emb,
            "en_tokens": en_tokens,
            "en_mask": batch["en_mask"].bool(),
            "tgt_tokens": tgt_tokens,
            "tgt_mask": batch["tgt_mask"].bool(),
            "item_index": batch["item_index"],
        }

    def compute_losses(self, outputs: dict[str, Tensor], gather: Gather | None = None) -> dict[str, Tensor]:
        weights = self.config.losses
        g = self._gather_fn(gather)
        visual, en, tgt, cl_en, cl_tgt, index = (
            g(outputs[k]) for k in ("visual_emb", "en_emb", "tgt_emb", "cl_en_emb", "cl_tgt_emb", "item_index")
        )
        terms = {
            "vs": id_aware_infonce(visual, en, index, self.temperature),
            "vt": id_aware_infonce(visual, tgt, index, self.temperature),
            "cl": id_aware_infonce(cl_en, cl_tgt, index, self.cl_temperature),
            # Per (English, translation) pair: no gather needed.
            "ot": word_ot_loss(
                outputs["en_tokens"], outputs["en_mask"], outputs["tgt_tokens"], outputs["tgt_mask"],
                epsilon=weights.ot_epsilon, iterations=weights.ot_iterations,
            ),
            "rd": relational_distillation_loss(cl_en, cl_tgt, visual, tgt, tau=weights.tau_kd),
        }
        terms["total"] = terms["vs"] + terms["vt"] + terms["cl"] + weights.w_ot * terms["ot"] + weights.w_rd * terms["rd"]
        return terms
