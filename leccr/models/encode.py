"""Batched, gradient-free encoding of a whole split for scoring (validation and evaluation share it)."""

from __future__ import annotations

import torch

from leccr.data import EvalItems


@torch.no_grad()
def encode_texts(
    model, ids: torch.Tensor, mask: torch.Tensor, batch_size: int, device: torch.device | str
) -> torch.Tensor:
    """[N, L] ids and mask -> [N, E] normalised text embeddings, float32 on the CPU."""
    chunks = [
        model.encode_text(ids[start : start + batch_size].to(device), mask[start : start + batch_size].to(device))
        .float()
        .cpu()
        for start in range(0, len(ids), batch_size)
    ]
    return torch.cat(chunks) if chunks else torch.empty(0)


@torch.no_grad()
def encode_items(
    model, items: EvalItems, batch_size: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every item -> (global [N, E], slot features [N, N_q, E] or None), float32 on the CPU."""
    globals_, slots = [], []
    for start in range(0, len(items.item_ids), batch_size):
        rows = slice(start, start + batch_size)
        global_emb, slot_emb = model.encode_visual(
            items.visual[rows].to(device),
            items.visual_mask[rows].to(device),
            desc_ids=items.desc_ids[rows].to(device),
            desc_mask=items.desc_mask[rows].to(device),
            desc_states=items.desc_states[rows].to(device) if items.desc_states is not None else None,
        )
        globals_.append(global_emb.float().cpu())
        if slot_emb is not None:
            slots.append(slot_emb.float().cpu())
    return torch.cat(globals_), (torch.cat(slots) if slots else None)
