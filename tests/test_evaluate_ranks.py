"""The stage's fused score in blocks (global min/max pass first) against the whole-matrix score.

Ranks, recall and top-k themselves are `leccr.evaluation.metrics` (tested in tests/test_metrics.py); here: the
blocks the stage hands to them equal the model helper's whole-matrix fused score, so the chunked
metrics equal the naive ones on that matrix."""
from __future__ import annotations

import numpy as np
import torch

from leccr.evaluation.metrics import chunked_ranks, naive_ranks
from leccr.models.base import fused_score
from leccr.stages.evaluate import make_score_block


def stitch(block, n_texts: int, n_items: int, chunk: int) -> torch.Tensor:
    return torch.cat([torch.cat([block(slice(r, min(r + chunk, n_texts)), slice(c, min(c + chunk, n_items)))
                                 for c in range(0, n_items, chunk)], dim=1) for r in range(0, n_texts, chunk)])


def test_fused_block_equals_full_matrix_score():
    generator = torch.Generator().manual_seed(1)
    n_texts, n_items, n_slots, width = 19, 11, 3, 8
    text = torch.nn.functional.normalize(torch.randn(n_texts, width, generator=generator), dim=-1)
    visual = torch.nn.functional.normalize(torch.randn(n_items, width, generator=generator), dim=-1)
    slots = torch.randn(n_items, n_slots, width, generator=generator)
    # by hand: minmax over the whole matrices, slot part = max over slots
    global_sim = text @ visual.t()
    slot_sim = torch.stack([(slots[j] @ text.t()).max(0).values for j in range(n_items)], dim=1)
    by_hand = 0.7 * (global_sim - global_sim.min()) / (global_sim.max() - global_sim.min()) + \
        0.3 * (slot_sim - slot_sim.min()) / (slot_sim.max() - slot_sim.min())
    torch.testing.assert_close(fused_score(text, visual, slots, 0.7), by_hand)
    # a 4x4 block only sees its own rows and columns; the ranges come from the first pass
    block = make_score_block(text, visual, slots, 0.7, chunk_size=4)
    torch.testing.assert_close(stitch(block, n_texts, n_items, 4), by_hand)
    text_item = np.arange(n_texts) % n_items
    chunked = chunked_ranks(block, text_item, n_items, 4, 4)
    naive = naive_ranks(by_hand, text_item)
    np.testing.assert_array_equal(chunked[0], naive[0])
    np.testing.assert_array_equal(chunked[1], naive[1])
    # a block's own min/max would give other values: the global pass matters
    first = block(slice(0, 4), slice(0, 4))
    assert first.min() > 0 or first.max() < 1


def test_alpha_one_is_the_plain_cosine_without_slots():
    generator = torch.Generator().manual_seed(2)
    text, visual = torch.randn(5, 4, generator=generator), torch.randn(3, 4, generator=generator)
    block = make_score_block(text, visual, None, 1.0, chunk_size=2)
    torch.testing.assert_close(stitch(block, 5, 3, 2), text @ visual.t())
