"""Retrieval metrics: hand-built score matrices with known ranks, chunked == naive exactly,
min/max and top-k against torch on the full matrix."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from leccr.evaluation.metrics import (chunked_ranks, chunked_retrieval_metrics, embedding_score_block, matrix_min_max,
                           matrix_score_block, naive_ranks, naive_retrieval_metrics, recall_metrics, topk_items,
                           topk_texts)

CHUNKS = [(1, 1), (2, 3), (3, 2), (100, 100)]


@pytest.fixture(params=["kernel", "torch"])
def counting(request, monkeypatch):
    """Run a test with each way of counting a block: the compiled CPU kernel (what a CPU evaluation
    uses) and the torch ops a GPU evaluation uses, forced here on CPU."""
    import leccr.evaluation.metrics as metrics

    if request.param == "torch":
        # (block, rows, cols, 4 targets, n_texts, pool, threads): the torch path takes all but the last two
        monkeypatch.setattr(metrics, "_count_block", lambda *args: metrics._count_block_torch(*args[:8]))
    return request.param


def both_paths(scores, text_item):
    """Ranks from the naive path, after checking every chunking gives the same ranks."""
    t2v, v2t = naive_ranks(scores, text_item)
    for text_chunk, item_chunk in CHUNKS:
        c_t2v, c_v2t = chunked_ranks(matrix_score_block(scores), text_item, scores.shape[1], text_chunk, item_chunk)
        assert c_t2v.tolist() == t2v.tolist(), (text_chunk, item_chunk)
        assert c_v2t.tolist() == v2t.tolist(), (text_chunk, item_chunk)
    return t2v.tolist(), v2t.tolist()


def test_one_caption_per_item_by_hand():
    # rows = captions (caption i belongs to item i), columns = items
    scores = torch.tensor([[0.9, 0.1, 0.2],    # caption 0: own item best                   -> 1
                           [0.8, 0.5, 0.7],    # caption 1: items 0, 2 beat 0.5             -> 3
                           [0.1, 0.6, 0.3]])   # caption 2: item 1 beats 0.3                -> 2
    # item 0 (column 0): 0.9 best -> 1; item 1: 0.6 (caption 2) beats 0.5 -> 2; item 2: 0.7 beats 0.3 -> 2
    t2v, v2t = both_paths(scores, [0, 1, 2])
    assert t2v == [1, 3, 2]
    assert v2t == [1, 2, 2]
    metrics = recall_metrics(t2v, v2t, ks=(1, 2))
    assert metrics["text_to_visual_R@1"] == pytest.approx(100 / 3)
    assert metrics["text_to_visual_R@2"] == pytest.approx(200 / 3)
    assert metrics["text_to_visual_mean_rank"] == pytest.approx(2.0)
    assert metrics["text_to_visual_median_rank"] == 2.0
    assert metrics["visual_to_text_R@1"] == pytest.approx(100 / 3)
    assert metrics["visual_to_text_R@2"] == pytest.approx(100.0)
    assert metrics["visual_to_text_mean_rank"] == pytest.approx(5 / 3)
    assert metrics["visual_to_text_median_rank"] == 2.0
    assert metrics["sumr"] == pytest.approx(100 / 3 + 200 / 3 + 100 / 3 + 100)


def test_several_captions_per_item_best_caption_counts():
    # captions 0, 1 -> item 0; captions 2, 3 -> item 1
    scores = torch.tensor([[0.2, 0.9],     # caption 0 (item 0): 0.9 beats 0.2 -> 2
                           [0.7, 0.1],     # caption 1 (item 0): own best      -> 1
                           [0.6, 0.3],     # caption 2 (item 1): 0.6 beats     -> 2
                           [0.5, 0.4]])    # caption 3 (item 1): 0.5 beats     -> 2
    t2v, v2t = both_paths(scores, [0, 0, 1, 1])
    assert t2v == [2, 1, 2, 2]
    # item 0: column [0.2, 0.7, 0.6, 0.5], best caption 1 (0.7) is first -> 1
    # item 1: column [0.9, 0.1, 0.3, 0.4], caption 0 (0.9) first, then caption 3 (0.4) -> 2
    assert v2t == [1, 2]
    metrics = recall_metrics(t2v, v2t, ks=(1, 5, 10))
    assert metrics["text_to_visual_R@1"] == 25.0
    assert metrics["text_to_visual_R@5"] == 100.0
    assert metrics["text_to_visual_mean_rank"] == 1.75
    assert metrics["text_to_visual_median_rank"] == 2.0      # middle ranks (2, 2): floor(2 - 1) + 1
    assert metrics["visual_to_text_R@1"] == 50.0
    # the papers' itm_eval: floor(median of 0-based ranks [0, 1] = 0.5) + 1 = 1, not numpy's 1.5
    assert metrics["visual_to_text_median_rank"] == 1.0
    assert metrics["sumr"] == 25 + 100 + 100 + 50 + 100 + 100


def test_ties_follow_the_stable_sort_lower_index_first():
    scores = torch.tensor([[0.5, 0.5, 0.5],    # caption 0 -> item 1: item 0 ties and has a lower index -> 2
                           [0.5, 0.5, 0.5],    # caption 1 -> item 0: first of the tie                   -> 1
                           [0.5, 0.5, 0.5],    # caption 2 -> item 2: items 0 and 1 tie before it       -> 3
                           [0.9, 0.5, 0.2]])   # caption 3 -> item 1: item 0 higher                      -> 2
    t2v, v2t = both_paths(scores, [1, 0, 2, 1])
    assert t2v == [2, 1, 3, 2]
    # item 0 column [0.5, 0.5, 0.5, 0.9]: caption 3 higher, caption 0 ties at lower index, own caption 1 -> 3
    # item 1 column [0.5, 0.5, 0.5, 0.5]: own captions 0 and 3; caption 0 is first -> 1
    # item 2 column [0.5, 0.5, 0.5, 0.2]: own caption 2, captions 0 and 1 tie before it -> 3
    assert v2t == [3, 1, 3]


def test_item_without_caption_is_a_candidate_but_not_a_query():
    # item 1 has no caption; it still beats caption 0's own item in text->visual
    scores = torch.tensor([[0.3, 0.8, 0.1],    # caption 0 -> item 0: item 1 beats -> 2
                           [0.2, 0.9, 0.6]])   # caption 1 -> item 2: item 1 beats -> 2
    t2v, v2t = both_paths(scores, [0, 2])
    assert t2v == [2, 2]
    assert v2t == [1, 0, 1]                     # 0: item 1 has no caption, no query
    metrics = recall_metrics(t2v, v2t, ks=(1,))
    assert metrics["visual_to_text_queries"] == 2.0
    assert metrics["visual_to_text_R@1"] == 100.0
    assert metrics["visual_to_text_mean_rank"] == 1.0
    assert metrics["text_to_visual_R@1"] == 0.0
    assert metrics["text_to_visual_queries"] == 2.0


def test_hand_metrics_ten_items():
    # 10 items, one caption each; caption i's own score sits so that its rank is ranks[i]
    ranks = [1, 2, 3, 5, 6, 10, 11, 1, 4, 7]
    n = 12
    scores = torch.zeros(len(ranks), n)
    for i, rank in enumerate(ranks):
        others = [j for j in range(n) if j != i]
        # others get 1.0 (higher) for the first rank-1 of them, -1.0 after
        scores[i, others[:rank - 1]] = 1.0
        scores[i, others[rank - 1:]] = -1.0
    t2v, _ = naive_ranks(scores, list(range(10)))
    assert t2v.tolist() == ranks
    metrics = naive_retrieval_metrics(scores, list(range(10)))
    assert metrics["text_to_visual_R@1"] == 20.0
    assert metrics["text_to_visual_R@5"] == 60.0
    assert metrics["text_to_visual_R@10"] == 90.0      # all but the rank 11
    assert metrics["text_to_visual_mean_rank"] == 5.0
    # sorted 0-based ranks 0 0 1 2 3 | 4 5 6 9 10: median 3.5, floor + 1 = 4 (numpy's 1-based median: 4.5)
    assert metrics["text_to_visual_median_rank"] == 4.0
    assert metrics == chunked_retrieval_metrics(matrix_score_block(scores), list(range(10)), n, text_chunk=3,
                                                item_chunk=5)


@pytest.mark.parametrize("n_texts,n_items,text_chunk,item_chunk", [
    (1, 1, 1, 1), (7, 3, 2, 2), (30, 11, 7, 4), (64, 64, 64, 64), (50, 20, 13, 100), (37, 41, 5, 9),
])
@pytest.mark.parametrize("grouped", [True, False])
def test_chunked_equals_naive_on_random_matrices(n_texts, n_items, text_chunk, item_chunk, grouped, counting):
    generator = torch.Generator().manual_seed(n_texts * 1000 + n_items)
    text_item = torch.randint(0, n_items, (n_texts,), generator=generator)
    if grouped:
        text_item = torch.sort(text_item).values
    # small integer scores: many ties; the same with infinities (tied too, and as targets); a
    # continuous matrix without ties
    with_infinities = torch.randint(-3, 4, (n_texts, n_items), generator=generator).float()
    with_infinities[torch.rand(n_texts, n_items, generator=generator) < 0.2] = torch.inf
    with_infinities[torch.rand(n_texts, n_items, generator=generator) < 0.2] = -torch.inf
    for scores in (torch.randint(-3, 4, (n_texts, n_items), generator=generator).float(), with_infinities,
                   torch.randn(n_texts, n_items, generator=generator)):
        naive = naive_ranks(scores, text_item)
        chunked = chunked_ranks(matrix_score_block(scores), text_item, n_items, text_chunk, item_chunk)
        np.testing.assert_array_equal(chunked[0], naive[0])
        np.testing.assert_array_equal(chunked[1], naive[1])
        assert (naive[1] == 0).sum() == n_items - len(set(text_item.tolist()))


def test_embedding_blocks_equal_naive_with_exact_integer_scores():
    generator = torch.Generator().manual_seed(0)
    visual = torch.randint(-2, 3, (40, 8), generator=generator).float()
    text_item = torch.arange(40).repeat_interleave(2)
    text = visual[text_item] + torch.randint(-2, 3, (80, 8), generator=generator).float()
    block = embedding_score_block(text, visual)
    assert chunked_retrieval_metrics(block, text_item, 40, text_chunk=16, item_chunk=7) == \
        naive_retrieval_metrics(text @ visual.T, text_item)


def test_min_max_pass_matches_torch():
    scores = torch.randn(23, 17, generator=torch.Generator().manual_seed(1))
    for text_chunk, item_chunk in [(1, 1), (5, 4), (23, 17), (100, 3)]:
        low, high = matrix_min_max(matrix_score_block(scores), 23, 17, text_chunk, item_chunk)
        assert low == float(scores.min()) and high == float(scores.max())


@pytest.mark.parametrize("k", [1, 3, 8, 50])
def test_topk_matches_full_stable_sort(k):
    generator = torch.Generator().manual_seed(k)
    for scores in (torch.randint(-2, 3, (19, 13), generator=generator).float(), torch.randn(19, 13, generator=generator)):
        full = torch.sort(scores, dim=1, descending=True, stable=True)
        values, index = topk_items(matrix_score_block(scores), 19, 13, k, text_chunk=4, item_chunk=5)
        assert torch.equal(index, full.indices[:, :k]) and torch.equal(values, full.values[:, :k])
        full_t = torch.sort(scores.T, dim=1, descending=True, stable=True)
        values, index = topk_texts(matrix_score_block(scores), 19, 13, k, text_chunk=6, item_chunk=4)
        assert torch.equal(index, full_t.indices[:, :k]) and torch.equal(values, full_t.values[:, :k])
        values, index = topk_items(matrix_score_block(scores), 19, 13, k, item_chunk=3, texts=[18, 0, 5])
        assert torch.equal(index, full.indices[[18, 0, 5], :k])


def test_errors_name_the_problem(counting):
    scores = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="text 1 belongs to item 3"):
        chunked_ranks(matrix_score_block(scores), [0, 3], 3)
    with pytest.raises(ValueError, match="returned shape"):
        chunked_ranks(lambda rows, cols: torch.zeros(1, 1), [0, 1], 3, text_chunk=2, item_chunk=2)
    scores[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN at text 1, item 2"):
        chunked_ranks(matrix_score_block(scores), [0, 1], 3)
    with pytest.raises(ValueError, match="no query"):
        recall_metrics([1, 2], [0, 0])


def test_chance_sumr_matches_hand_computed_probabilities():
    from leccr.evaluation.metrics import chance_sumr

    # 4 items, one caption each, K = 1 and 2: t2v 1/4 + 2/4; v2t the same (1 - C(3,K)/C(4,K)).
    assert chance_sumr([0, 1, 2, 3], 4, ks=(1, 2)) == pytest.approx(100 * (0.25 + 0.5) * 2)
    # 2 items, item 0 with 2 captions, item 1 with 1 (N_t = 3), K = 1:
    # t2v 1/2; v2t item 0: 1 - C(1,1)/C(3,1) = 2/3, item 1: 1 - C(2,1)/C(3,1) = 1/3 -> mean 1/2.
    assert chance_sumr([0, 0, 1], 2, ks=(1,)) == pytest.approx(100 * (0.5 + 0.5))
    # K beyond the gallery: everything is found.
    assert chance_sumr([0, 1], 2, ks=(5,)) == pytest.approx(200.0)
    # An item with no caption is not a visual->text query.
    assert chance_sumr([0, 0], 3, ks=(1,)) == pytest.approx(100 * (1 / 3 + 1.0))



@pytest.mark.parametrize("order", ["one_per_item", "grouped", "scattered"])
def test_chunked_ranks_tile_by_tile_read_each_block_once_when_grouped(order, monkeypatch, counting):
    # torch: tiles of 2 rows inside blocks of 6 x 6, every tile boundary and tie shortcut is crossed;
    # kernel: each block's rows split over threads
    monkeypatch.setattr("leccr.evaluation.metrics.TILE_BYTES", 2 * 4 * 6)
    generator = torch.Generator().manual_seed(5)
    n_items = 23
    text_item = {"one_per_item": torch.arange(n_items),
                 "grouped": torch.sort(torch.randint(0, n_items, (40,), generator=generator)).values,
                 "scattered": torch.randint(0, n_items, (40,), generator=generator)}[order]
    scores = torch.randint(-2, 3, (len(text_item), n_items), generator=generator).float()
    calls = []

    def block(rows, cols):
        calls.append((rows.start, cols.start))
        return scores[rows, cols]

    chunked = chunked_ranks(block, text_item, n_items, 6, 6)
    naive = naive_ranks(scores, text_item)
    np.testing.assert_array_equal(chunked[0], naive[0])
    np.testing.assert_array_equal(chunked[1], naive[1])
    grid = len(range(0, len(text_item), 6)) * len(range(0, n_items, 6))
    assert len(set(calls)) == grid
    if order == "one_per_item":
        # caption i <-> item i on the same grid: the diagonal blocks of pass 1 hold every target they
        # are compared with, so they are counted there and not read again
        assert len(calls) == grid
