"""Visual tokens from cached features: image patch tokens pass through, video frames get encoded.

Images: the features stage caches the vision tower's output tokens ([CLS] first, then patches);
they pass through, with a linear map to D_v only if the cached width differs.
Video: per-frame features (padded to N_v frames with a frame mask) go through the reference's
1-layer self-attention frame encoder (same layer shape as the cross-attention layer).
"""

from __future__ import annotations

from torch import Tensor, nn

from leccr.models.layers import SelfAttentionStack, padding_mask_from_valid


class VisualEncoder(nn.Module):
    """forward(visual [B, N_v, D_vin] float, visual_mask [B, N_v] bool, True = valid) -> tokens [B, N_v, D_v]."""

    def __init__(
        self,
        input_dim: int,
        width: int,
        modality: str,
        num_heads: int,
        frame_encoder_layers: int,
        dropout: float,
    ) -> None:
        super().__init__()
        if modality not in ("image", "video"):
            raise ValueError(f"modality must be 'image' or 'video', got {modality!r}")
        self.modality = modality
        self.input_dim = input_dim
        self.width = width
        # Only when widths differ: an identity keeps the reference's pass-through of CLIP tokens.
        self.input_proj: nn.Module = nn.Linear(input_dim, width) if input_dim != width else nn.Identity()
        self.frame_encoder = (
            SelfAttentionStack(width, num_heads, frame_encoder_layers, dropout) if modality == "video" else None
        )

    def forward(self, visual: Tensor, visual_mask: Tensor | None = None) -> Tensor:
        if visual.dim() != 3 or visual.shape[-1] != self.input_dim:
            raise ValueError(
                f"visual features must be [B, N_v, {self.input_dim}], got {tuple(visual.shape)} "
                "(set the model's visual_input_dim to the cached features' width)"
            )
        tokens = self.input_proj(visual)
        if self.frame_encoder is not None:
            tokens = self.frame_encoder(tokens, padding_mask_from_valid(visual_mask))
        return tokens
