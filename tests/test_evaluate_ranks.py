"""Chunked ranks, recall, the fused score in blocks and the top-k merge against hand-computed and
full-matrix references."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from leccr.models.base import fused_score
from stages.evaluate import (first_hit_ranks, make_score_block, naive_first_hit_ranks, summarise,
                             top_candidates)


def block_of(scores: torch.Tensor):
    return lambda rows, cols: scores[rows, cols]


def test_ranks_one_caption_per_item_by_hand():
    # rows = captions (caption i belongs to item i), columns = items
    scores = torch.tensor([[0.9, 0.1, 0.2],   # caption 0: its item first          -> rank 1
                           [0.8, 0.5, 0.7],   # caption 1: items 0 and 2 beat 0.5  -> rank 3
                           [0.1, 0.6, 0.3]])  # caption 2: item 1 beats 0.3        -> rank 2
    text_item = np.array([0, 1, 2])
    # items as queries: column 0: 0.9 is best -> 1; column 1: 0.6 (caption 2) beats 0.5 -> 2;
    # column 2: 0.7 (caption 1) beats 0.3 -> 2
    for chunk in (1, 2, 3):
        t2v, v2t = first_hit_ranks(block_of(scores), text_item, 3, chunk)
        assert t2v.tolist() == [1, 3, 2]
        assert v2t.tolist() == [1, 2, 2]


def test_ranks_several_captions_per_item_any_caption_counts():
    # items 0 and 1, captions 0,1 -> item 0, captions 2,3 -> item 1
    scores = torch.tensor([[0.2, 0.9],
                           [0.7, 0.1],
                           [0.6, 0.3],
                           [0.5, 0.4]])
    text_item = np.array([0, 0, 1, 1])
    t2v, v2t = first_hit_ranks(block_of(scores), text_item, 2, 3)
    assert t2v.tolist() == [2, 1, 2, 2]
    # item 0: its best caption is caption 1 (0.7), nothing beats it -> 1;
    # item 1: its best caption is caption 3 (0.4), caption 0 (0.9) beats it -> 2
    assert v2t.tolist() == [1, 2]
    stats = summarise(t2v, [1, 2])
    assert stats == {"R@1": 25.0, "R@2": 100.0, "mean_rank": 1.75, "median_rank": 2.0}


def test_ties_go_to_the_query_and_uncaptioned_items_are_left_out():
    scores = torch.tensor([[0.5, 0.5, 0.5],
                           [0.1, 0.5, 0.5]])
    text_item = np.array([0, 1])  # item 2 has no caption
    t2v, v2t = first_hit_ranks(block_of(scores), text_item, 3, 2)
    assert t2v.tolist() == [1, 1]  # equal scores do not push the hit down
    assert v2t.tolist() == [1, 1, 0]  # 0 = not a query (no caption can be found)
    assert summarise(v2t, [1])["R@1"] == 100.0


@pytest.mark.parametrize("chunk", [1, 7, 16, 100])
def test_chunked_ranks_equal_full_matrix_ranks(chunk):
    generator = torch.Generator().manual_seed(0)
    n_items, per_item = 23, 3
    text_item = np.repeat(np.arange(n_items), per_item)
    np.random.default_rng(0).shuffle(text_item)
    scores = torch.randn(len(text_item), n_items, generator=generator)
    scores[5] = scores[5].round(decimals=0)  # many exact ties in one row
    expected = naive_first_hit_ranks(scores, text_item)
    got = first_hit_ranks(block_of(scores), text_item, n_items, chunk)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    # and against argsort ranking (no ties outside row 5): position of the first hit in the sorted row
    order = torch.argsort(scores[0], descending=True)
    assert got[0][0] == int((order == int(text_item[0])).nonzero()) + 1


def test_fused_block_equals_full_matrix_score():
    generator = torch.Generator().manual_seed(1)
    n_texts, n_items, n_slots, width = 19, 11, 3, 8
    text = torch.nn.functional.normalize(torch.randn(n_texts, width, generator=generator), dim=-1)
    visual = torch.nn.functional.normalize(torch.randn(n_items, width, generator=generator), dim=-1)
    slots = torch.randn(n_items, n_slots, width, generator=generator)
    full = fused_score(text, visual, slots, 0.7)
    # naive by hand: minmax over the whole matrices
    global_sim = text @ visual.t()
    slot_sim = torch.stack([(slots[j] @ text.t()).max(0).values for j in range(n_items)], dim=1)
    by_hand = 0.7 * (global_sim - global_sim.min()) / (global_sim.max() - global_sim.min()) + \
        0.3 * (slot_sim - slot_sim.min()) / (slot_sim.max() - slot_sim.min())
    torch.testing.assert_close(full, by_hand)
    block = make_score_block(text, visual, slots, 0.7, chunk_size=4)
    stitched = torch.cat([torch.cat([block(slice(r, min(r + 4, n_texts)), slice(c, min(c + 4, n_items)))
                                     for c in range(0, n_items, 4)], dim=1) for r in range(0, n_texts, 4)])
    torch.testing.assert_close(stitched, by_hand)
    text_item = np.arange(n_texts) % n_items
    chunked = first_hit_ranks(block, text_item, n_items, 4)
    naive = naive_first_hit_ranks(by_hand, text_item)
    np.testing.assert_array_equal(chunked[0], naive[0])
    np.testing.assert_array_equal(chunked[1], naive[1])
    # alpha 1: plain cosine, no slots needed
    plain = make_score_block(text, visual, None, 1.0, chunk_size=4)
    torch.testing.assert_close(plain(slice(0, n_texts), slice(0, n_items)), global_sim)


def test_top_candidates_equal_full_topk():
    generator = torch.Generator().manual_seed(2)
    scores = torch.randn(17, 13, generator=generator)
    queries = [3, 0, 12]
    index, values = top_candidates(block_of(scores), queries, 17, 13, "text_to_visual", 3, chunk_size=5)
    expected = scores[queries].topk(3, dim=1)
    np.testing.assert_array_equal(index, expected.indices.numpy())
    np.testing.assert_allclose(values, expected.values.double().numpy())
    index, values = top_candidates(block_of(scores), queries, 17, 13, "visual_to_text", 4, chunk_size=5)
    expected = scores[:, queries].t().topk(4, dim=1)
    np.testing.assert_array_equal(index, expected.indices.numpy())
