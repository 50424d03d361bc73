"""The one attention layer LECCR uses everywhere, and stacks of it.

METHOD.md "Modules" 3: `a = MHA(query=x, key=m, value=m)`;
`x' = LayerNorm(x + Dropout(W2 · Dropout(GELU(W1 · a))))`, W1 and W2 square, dropout 0.1.
The residual adds the MLP of the attention output to the *input* x: there is no residual around the
attention itself and no separate feed-forward block (this is the reference `CrossAttentionLayer`).
The attention weights get the same dropout (nn.MultiheadAttention's `dropout`), as in the reference.

Masks follow torch's key-padding convention here: `memory_padding_mask` is True where a memory
position is padding and must be ignored. The models convert from the batch contract (True = valid).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class CrossAttentionLayer(nn.Module):
    """x' = LayerNorm(x + Dropout(W2 · Dropout(GELU(W1 · MHA(x, m, m))))).

    Shapes: x [B, Q, D], memory [B, M, D], memory_padding_mask [B, M] bool (True = ignore) -> [B, Q, D].
    """

    def __init__(self, width: int, num_heads: int, dropout: float = 0.1) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        self.attention = nn.MultiheadAttention(width, num_heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(width, width)
        self.linear2 = nn.Linear(width, width)
        self.inner_dropout = nn.Dropout(dropout)
        self.output_dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: Tensor, memory: Tensor, memory_padding_mask: Tensor | None = None) -> Tensor:
        attended, _ = self.attention(x, memory, memory, key_padding_mask=memory_padding_mask, need_weights=False)
        update = self.linear2(self.inner_dropout(F.gelu(self.linear1(attended))))
        return self.norm(x + self.output_dropout(update))


class CrossAttentionStack(nn.Module):
    """`num_layers` cross-attention layers; each attends from the previous output to the same memory.

    Shapes: x [B, Q, D], memory [B, M, D], memory_padding_mask [B, M] (True = ignore) -> [B, Q, D].
    """

    def __init__(self, width: int, num_heads: int, num_layers: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CrossAttentionLayer(width, num_heads, dropout) for _ in range(num_layers))

    def forward(self, x: Tensor, memory: Tensor, memory_padding_mask: Tensor | None = None) -> Tensor:
        for layer in self.layers:
            x = layer(x, memory, memory_padding_mask)
        return x


class SelfAttentionStack(nn.Module):
    """The video frame encoder: layers of the same shape with query = key = value = the current x.

    Shapes: x [B, N, D], padding_mask [B, N] (True = padded frame, ignored as a key) -> [B, N, D].
    Padded positions still get outputs (they attend to the valid frames); callers mask them later.
    """

    def __init__(self, width: int, num_heads: int, num_layers: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CrossAttentionLayer(width, num_heads, dropout) for _ in range(num_layers))

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        for layer in self.layers:
            x = layer(x, x, padding_mask)
        return x


def padding_mask_from_valid(valid_mask: Tensor | None) -> Tensor | None:
    """Batch-contract mask (True = valid) -> torch key-padding mask (True = ignore)."""
    if valid_mask is None:
        return None
    return ~valid_mask.bool()
