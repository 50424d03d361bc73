"""LECCR (ACM MM 2024): MLLM-description slots, vision<->slot interaction, local matching and
softened matching under English guidance, on top of the global contrastive baseline.

Data flow per batch (METHOD.md "Modules" and "The reference implementation" 6-7):
  V  = visual tokens (cached patch tokens, or frames through the frame encoder)      [B, N_v, D_v]
  C  = caption_proj(description token states)                                     [B, L_c, D_v]
  S  = slot cross-attention(queries (zeros at init), C, description padding masked) [B, N_q, D_v]
  V' = vision->slots(V, S)   (no mask)         S' = slots->vision(S, V, frame mask)
  f_v = normalize(vision_proj(pool(V')))        g = caption_proj1(S')  [B, N_q, E] (not normalised)
  L_cv on cproj(S), vproj(V); L_reg on S; L_c, L_dstl and the inference score on g.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from leccr.models.losses import (
    Gather,
    assemble_leccr_total,
    caption_slot_loss,
    id_aware_infonce,
    slot_diversity_loss,
    slot_vision_loss,
    softened_matching_loss,
)
from leccr.models.base import RetrievalModel
from leccr.models.config import ModelConfig
from leccr.models.layers import CrossAttentionStack, padding_mask_from_valid
from leccr.models.text_encoder import TextEncoder


class LeccrModel(RetrievalModel):
    """forward(batch) -> visual_emb, en_emb, tgt_emb [B, E], item_index [B], and with slots on:
    slot_emb [B, N_q, E], slots [B, N_q, D_v], slot_proj [B, N_q, D_v], token_proj [B, N_v, D_v],
    visual_mask [B, N_v]. losses: vs, vt, st (+ c_s, c_t, c, cv, reg, dstl when on) and total.
    """

    def __init__(self, config: ModelConfig, text_encoder: TextEncoder) -> None:
        super().__init__(config, text_encoder)
        self.use_slots = config.ablations.slots
        self.use_interaction = config.ablations.slots and config.ablations.interaction
        if self.use_slots:
            width = config.visual_dim
            self.caption_proj = nn.Linear(text_encoder.width, width)
            # Zeros at init (reference): all slots start equal and differ only through attention.
            self.queries = nn.Parameter(torch.zeros(config.num_slots, width))
            self.slot_attention = CrossAttentionStack(width, config.num_heads, config.slot_layers, config.dropout)
            self.caption_proj1 = nn.Linear(width, config.embed_dim)
            self.cproj = nn.Linear(width, width)
            self.vproj = nn.Linear(width, width)
            if self.use_interaction:
                self.vision_to_slots = CrossAttentionStack(width, config.num_heads, config.interaction_layers, config.dropout)
                self.slots_to_vision = CrossAttentionStack(width, config.num_heads, config.interaction_layers, config.dropout)

    # ----- descriptions and slots
    def description_states(
        self, desc_ids: Tensor | None, desc_mask: Tensor | None, desc_states: Tensor | None
    ) -> Tensor:
        """Description token states [B, L_c, D_t]: cached, or re-encoded by the shared encoder without grad."""
        if desc_mask is None:
            raise ValueError("the batch has no desc_mask: LECCR slots need the description padding mask")
        if self.config.description_encoder == "cached":
            if desc_states is None:
                raise ValueError(
                    "description_encoder is 'cached' but the batch has no desc_states "
                    "(token states cached by the features stage); pass them or use description_encoder: shared"
                )
            if desc_states.shape[-1] != self.text_encoder.width:
                raise ValueError(
                    f"desc_states width {desc_states.shape[-1]} != text encoder width {self.text_encoder.width}"
                )
            return desc_states
        if desc_ids is None:
            raise ValueError("description_encoder is 'shared' but the batch has no desc_ids to encode")
        # The reference encodes descriptions with the shared (training) encoder under no_grad; the
        # encoder's train/eval mode is left as it is, so dropout applies in training as there.
        with torch.no_grad():
            states, _ = self.text_encoder(desc_ids, desc_mask)
        return states

    def slots_from_descriptions(self, states: Tensor, desc_mask: Tensor) -> Tensor:
        """[B, L_c, D_t], [B, L_c] (True = real token) -> slots S [B, N_q, D_v] (before interaction)."""
        memory = self.caption_proj(states)
        queries = self.queries.unsqueeze(0).expand(states.shape[0], -1, -1)
        return self.slot_attention(queries, memory, padding_mask_from_valid(desc_mask))

    def interact(self, tokens: Tensor, slots: Tensor, visual_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """(V', S'): vision->slots with no mask; slots->vision over the *original* tokens with the frame
        mask (all-valid for images, so it changes nothing there)."""
        if not self.use_interaction:
            return tokens, slots
        enhanced_tokens = self.vision_to_slots(tokens, slots)
        enhanced_slots = self.slots_to_vision(slots, tokens, padding_mask_from_valid(visual_mask))
        return enhanced_tokens, enhanced_slots

    def _visual_branch(
        self,
        visual: Tensor,
        visual_mask: Tensor | None,
        desc_ids: Tensor | None,
        desc_mask: Tensor | None,
        desc_states: Tensor | None,
    ) -> dict[str, Tensor]:
        tokens = self.visual_tokens(visual, visual_mask)
        if not self.use_slots:
            return {"tokens": tokens, "visual_emb": self.global_visual(tokens, visual_mask)}
        states = self.description_states(desc_ids, desc_mask, desc_states)
        slots = self.slots_from_descriptions(states, desc_mask)
        enhanced_tokens, enhanced_slots = self.interact(tokens, slots, visual_mask)
        return {
            "tokens": tokens,
            "slots": slots,
            "visual_emb": self.global_visual(enhanced_tokens, visual_mask),
            "slot_emb": self.caption_proj1(enhanced_slots),
        }

    def encode_visual(
        self,
        visual: Tensor,
        visual_mask: Tensor | None = None,
        desc_ids: Tensor | None = None,
        desc_mask: Tensor | None = None,
        desc_states: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """-> (f_v [N, E] normalised, g [N, N_q, E] = caption_proj1(S'), or None with slots off)."""
        branch = self._visual_branch(visual, visual_mask, desc_ids, desc_mask, desc_states)
        return branch["visual_emb"], branch.get("slot_emb")

    # ----- training
    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        visual_mask = batch.get("visual_mask")
        branch = self._visual_branch(
            batch["visual"], visual_mask, batch.get("desc_ids"), batch.get("desc_mask"), batch.get("desc_states")
        )
        outputs = {
            "visual_emb": branch["visual_emb"],
            "en_emb": self.encode_text(batch["en_ids"], batch["en_mask"]),
            "tgt_emb": self.encode_text(batch["tgt_ids"], batch["tgt_mask"]),
            "item_index": batch["item_index"],
        }
        if self.use_slots:
            tokens = branch["tokens"]
            if visual_mask is None:
                visual_mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            outputs.update(
                slot_emb=branch["slot_emb"],
                slots=branch["slots"],
                slot_proj=self.cproj(branch["slots"]),
                token_proj=self.vproj(tokens),
                visual_mask=visual_mask.bool(),
            )
        return outputs

    def compute_losses(self, outputs: dict[str, Tensor], gather: Gather | None = None) -> dict[str, Tensor]:
        cfg, weights, ablations = self.config, self.config.losses, self.config.ablations
        g = self._gather_fn(gather)
        visual, en, tgt, index = (g(outputs[k]) for k in ("visual_emb", "en_emb", "tgt_emb", "item_index"))
        terms = {
            "vs": id_aware_infonce(visual, en, index, self.temperature),
            "vt": id_aware_infonce(visual, tgt, index, self.temperature),
            "st": id_aware_infonce(en, tgt, index, self.temperature),
        }
        slot_emb_all = None
        if self.use_slots:
            if ablations.local_matching:
                # Local batch only, as in the reference's caption contrastive loss.
                terms["c_s"] = caption_slot_loss(outputs["slot_emb"], outputs["en_emb"], self.temperature)
                terms["c_t"] = caption_slot_loss(outputs["slot_emb"], outputs["tgt_emb"], self.temperature)
                terms["c"] = terms["c_s"] + terms["c_t"]
            # The reference gathers L_cv's inputs for images but keeps it per-GPU for video.
            g_cv = g if (cfg.modality == "image" or not cfg.reference_quirks) else self._gather_fn(None)
            terms["cv"] = slot_vision_loss(
                g_cv(outputs["slot_proj"]),
                g_cv(outputs["token_proj"]),
                g_cv(outputs["item_index"]),
                g_cv(outputs["visual_mask"]),
                reference_quirk=cfg.reference_quirks,
            )
            terms["reg"] = slot_diversity_loss(outputs["slots"])
            slot_emb_all = g(outputs["slot_emb"])
        if ablations.softened_matching:
            terms["dstl"] = softened_matching_loss(
                en, tgt, visual, slot_emb_all, alpha=weights.distill_alpha, reference_quirk=cfg.reference_quirks
            )
        terms["total"] = assemble_leccr_total(terms, weights)
        return terms
