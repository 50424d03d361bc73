"""What every method model shares, and the fused inference score.

The training loop and the evaluation treat all methods alike through `RetrievalModel`:

- `forward(batch) -> dict[str, Tensor]`: embeddings (and whatever the method's losses need);
- `losses(outputs, gather=None) -> dict[str, Tensor]`: every term separately, plus "total";
- `encode_text(ids, mask) -> [N, E]` (normalised);
- `encode_visual(visual, visual_mask, desc_ids=None, desc_mask=None, desc_states=None)
  -> (global [N, E] normalised, slots [N, N_q, E] or None)`;
- `score(text_emb, visual_global, visual_slots, alpha) -> [N_t, N_v]`, and for chunked evaluation
  `similarity_parts` + `score_ranges` + `fuse_scores` with precomputed global min/max.

Batch contract (dict of tensors): `visual` [B, N_v, D_vin] float, `visual_mask` [B, N_v] bool
(True = valid), `en_ids`/`en_mask` [B, L], `tgt_ids`/`tgt_mask` [B, L] (the translation),
`desc_ids`/`desc_mask` [B, L_c] or `desc_states` [B, L_c, D_t] + `desc_mask`, `item_index` [B] long
(items sharing an index are all positives; a dataset-wide id, so that it still means the same item
after the all-gather across ranks).

`gather` (optional): a callable `Tensor [b, ...] -> Tensor [R*b, ...]` concatenating a tensor over
the R data-parallel ranks in rank order, keeping the gradient of this rank's rows
(`leccr.models.losses.all_gather_with_grad`). The models gather the embeddings and `item_index` before the
in-batch losses, as the reference does across its 2 GPUs; None = a single process.

Gathered terms (vs, vt, st, dstl; cl, rd; L_cv on images, or on video with reference_quirks off):
every rank computes them over the whole gathered batch and back-propagates into its own rows only,
so for these terms the ranks' gradients sum to the single-process gradient of the gathered batch,
and DDP's average is that gradient / R.
Per-rank terms (the caption-slot CE L_c, the slot diversity L_reg, CL2CM's word-level OT, and video
L_cv with reference_quirks on, as the reference): each rank's own half, so after DDP's average they
keep their full weight while the gathered terms are scaled by 1/R: under R ranks w_c, w_reg, w_ot
(and video w_cv) weigh R times more against the gathered terms than in one process on the same batch.
The temperature is used after the gather: every rank gets the whole gathered-term gradient for it
(plus its own L_c part), so it steps R times further relative to the other parameters (reference
behaviour). tests/test_ddp.py checks every one of these relations with gloo on 2 processes.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leccr.models.losses import Gather, _identity
from leccr.models.config import ModelConfig
from leccr.models.text_encoder import TextEncoder
from leccr.models.visual_encoder import VisualEncoder


# ---------------------------------------------------------------- the fused score
def similarity_parts(
    text_emb: Tensor, visual_global: Tensor, visual_slots: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """(global f_t f_vᵀ, slot max_k g_k(v)·f_t), both [N_t, N_v] (the slot part None without slots).

    text_emb [N_t, E], visual_global [N_v, E], visual_slots [N_v, N_q, E] or None. Any number of
    captions per visual item: rows are captions, columns are visual items.
    """
    global_sim = text_emb @ visual_global.t()
    if visual_slots is None:
        return global_sim, None
    slot_sim = torch.einsum("te,vke->tvk", text_emb, visual_slots).max(dim=-1).values
    return global_sim, slot_sim


def score_ranges(global_sim: Tensor, slot_sim: Tensor | None) -> dict[str, tuple[float, float]]:
    """(min, max) of each part; for a chunked evaluation, combine the blocks' ranges with `merge_ranges`."""
    ranges = {"global": (float(global_sim.min()), float(global_sim.max()))}
    if slot_sim is not None:
        ranges["slot"] = (float(slot_sim.min()), float(slot_sim.max()))
    return ranges


def merge_ranges(
    first: dict[str, tuple[float, float]], second: dict[str, tuple[float, float]]
) -> dict[str, tuple[float, float]]:
    """The (min, max) of the union of two blocks, per part."""
    merged = dict(first)
    for part, (low, high) in second.items():
        if part in merged:
            merged[part] = (min(merged[part][0], low), max(merged[part][1], high))
        else:
            merged[part] = (low, high)
    return merged


def _scale(matrix: Tensor, low: float, high: float) -> Tensor:
    span = high - low
    return (matrix - low) / span if span > 0 else torch.zeros_like(matrix)


def fuse_scores(
    global_sim: Tensor,
    slot_sim: Tensor | None,
    alpha: float,
    ranges: dict[str, tuple[float, float]] | None = None,
) -> Tensor:
    """alpha·minmax(global) + (1−alpha)·minmax(slot), each minmax over the *whole* test matrix.

    `ranges` ({"global": (min, max), "slot": (min, max)}) are those of the whole matrices; None takes
    them from the given matrices (correct only when they are the whole matrices). alpha = 1 is
    global only (slot_sim may be None then).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    ranges = ranges if ranges is not None else score_ranges(global_sim, slot_sim)
    fused = alpha * _scale(global_sim, *ranges["global"])
    if alpha < 1.0:
        if slot_sim is None or "slot" not in ranges:
            raise ValueError(f"alpha {alpha} < 1 mixes in slot scores, but this model/evaluation has no slots")
        fused = fused + (1.0 - alpha) * _scale(slot_sim, *ranges["slot"])
    return fused


def fused_score(text_emb: Tensor, visual_global: Tensor, visual_slots: Tensor | None, alpha: float) -> Tensor:
    """The inference score of METHOD.md on the whole matrix: [N_t, E], [N_v, E], [N_v, N_q, E] -> [N_t, N_v]."""
    global_sim, slot_sim = similarity_parts(text_emb, visual_global, visual_slots if alpha < 1.0 else None)
    return fuse_scores(global_sim, slot_sim, alpha)


# ---------------------------------------------------------------- base model
def pool_visual(tokens: Tensor, visual_mask: Tensor | None, modality: str) -> Tensor:
    """[CLS] (token 0) for images; mean over valid frames for video. [B, N_v, D] -> [B, D]."""
    if modality == "image":
        return tokens[:, 0]
    if visual_mask is None:
        return tokens.mean(1)
    weights = visual_mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class RetrievalModel(nn.Module):
    """Shared text encoder + visual encoder + global projections + learnable temperature.

    Subclasses add their modules and define `forward` and `losses`.
    """

    def __init__(self, config: ModelConfig, text_encoder: TextEncoder) -> None:
        super().__init__()
        self.config = config
        self.text_encoder = text_encoder
        self.visual_encoder = VisualEncoder(
            input_dim=config.resolved_visual_input_dim,
            width=config.visual_dim,
            modality=config.modality,
            num_heads=config.num_heads,
            frame_encoder_layers=config.frame_encoder_layers,
            dropout=config.dropout,
        )
        self.text_proj = nn.Linear(text_encoder.width, config.embed_dim)
        self.vision_proj = nn.Linear(config.visual_dim, config.embed_dim)
        # τ: learnable, initialised at 0.07 and never clamped (reference quirk 4).
        self.temperature = nn.Parameter(torch.tensor(float(config.temperature_init)))

    @classmethod
    def from_pretrained_text(cls, config: ModelConfig, text_encoder_path: str | Path) -> RetrievalModel:
        return cls(config, TextEncoder.from_pretrained(text_encoder_path))

    # ----- encoders
    def encode_text(self, ids: Tensor, mask: Tensor) -> Tensor:
        """[N, L] ids and mask -> normalised [CLS] projection [N, E]."""
        _, cls_state = self.text_encoder(ids, mask)
        return F.normalize(self.text_proj(cls_state), dim=-1)

    def visual_tokens(self, visual: Tensor, visual_mask: Tensor | None) -> Tensor:
        return self.visual_encoder(visual, visual_mask)

    def global_visual(self, tokens: Tensor, visual_mask: Tensor | None) -> Tensor:
        return F.normalize(self.vision_proj(pool_visual(tokens, visual_mask, self.config.modality)), dim=-1)

    def encode_visual(
        self,
        visual: Tensor,
        visual_mask: Tensor | None = None,
        desc_ids: Tensor | None = None,
        desc_mask: Tensor | None = None,
        desc_states: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """-> (global [N, E] normalised, slot features [N, N_q, E] or None). Baseline: no slots."""
        return self.global_visual(self.visual_tokens(visual, visual_mask), visual_mask), None

    # ----- scoring
    def score(
        self, text_emb: Tensor, visual_global: Tensor, visual_slots: Tensor | None, alpha: float | None = None
    ) -> Tensor:
        """Fused score [N_t, N_v]; alpha None = the config's score_alpha."""
        return fused_score(text_emb, visual_global, visual_slots, self.config.score_alpha if alpha is None else alpha)

    similarity_parts = staticmethod(similarity_parts)
    score_ranges = staticmethod(score_ranges)
    fuse_scores = staticmethod(fuse_scores)

    # ----- optimiser groups
    def parameter_groups(
        self, lr: float, weight_decay: float, new_module_lr_multiplier: float = 1.0
    ) -> list[dict]:
        """AdamW parameter groups as in the reference `create_optimizer`.

        No weight decay for biases and normalisation weights (LayerNorm anywhere); decay for all
        else, the temperature and the slot queries included (the reference decays its `temp`).
        "New" parameters (everything outside the pretrained text encoder) get
        `lr * new_module_lr_multiplier`; the reference's multiplier never takes effect (its list of
        new parameters is empty), so 1.0 reproduces it. Empty groups are left out.
        """
        norm_params = {
            id(param) for module in self.modules() if isinstance(module, nn.LayerNorm) for param in module.parameters()
        }
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            decay = not (name.endswith("bias") or id(param) in norm_params)
            new = not name.startswith("text_encoder.")
            groups.setdefault((decay, new), []).append(param)
        return [
            {
                "params": params,
                "weight_decay": weight_decay if decay else 0.0,
                "lr": lr * (new_module_lr_multiplier if new else 1.0),
            }
            for (decay, new), params in sorted(groups.items())
        ]

    # ----- helpers for subclasses
    def _global_embeddings(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        visual_mask = batch.get("visual_mask")
        tokens = self.visual_tokens(batch["visual"], visual_mask)
        return {
            "visual_tokens": tokens,
            "en_emb": self.encode_text(batch["en_ids"], batch["en_mask"]),
            "tgt_emb": self.encode_text(batch["tgt_ids"], batch["tgt_mask"]),
        }

    @staticmethod
    def _gather_fn(gather: Gather | None) -> Gather:
        return gather if gather is not None else _identity

    @staticmethod
    def _float32(outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Floating outputs as float32: under bf16 autocast, logits divided by τ = 0.07 and the
        min-max/softmax targets lose too much precision, so the losses run in float32."""
        return {k: v.float() if v.is_floating_point() else v for k, v in outputs.items()}

    def losses(self, outputs: dict[str, Tensor], gather: Gather | None = None) -> dict[str, Tensor]:
        """Every loss term separately and "total"; computed in float32 with autocast off."""
        device_type = next(iter(outputs.values())).device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return self.compute_losses(self._float32(outputs), gather)

    def compute_losses(self, outputs: dict[str, Tensor], gather: Gather | None) -> dict[str, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError
