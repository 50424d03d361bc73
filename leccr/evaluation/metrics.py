"""Retrieval metrics: text->visual and visual->text R@K, mean and median rank, SumR.

Setting: N_t texts (captions) and N_v visual items; caption i belongs to exactly one item
`text_item[i]`; an item may have any number of captions, including none. Scores are a matrix
S [N_t, N_v] (rows = texts, columns = items), higher = better.

- text->visual: the rank of caption i's item among all N_v items in row i.
- visual->text: the rank, among all N_t texts in column j, of the best-ranked caption of item j
  (an item is found within K if any of its captions is within K). Items with no caption have no
  visual->text query: their rank is reported as 0 and they are left out of the visual->text metrics
  (they still compete as candidates in text->visual).

Ranks are 1-based and follow a *stable* descending sort: rank = 1 + #(strictly higher) +
#(equal with a lower index). That is exactly the order of `torch.sort(descending=True, stable=True)`,
so the chunked path below equals the full-matrix path bit for bit, ties included. Scores are compared
in the precision they were computed in: float64 scores stay float64 (two scores 1e-9 apart do not
tie), any other dtype (float32, float16, bfloat16) is compared as float32, which holds its values
exactly.

Two paths:
- `naive_ranks`: the whole matrix, a full stable argsort per query (as the papers' reference code
  does with `np.argsort`), for tests and the benchmark baseline.
- `chunked_ranks`: the matrix is only ever seen through `score_block(text_slice, item_slice)`
  [len(text_slice), len(item_slice)], block by block; nothing of size N_t x N_v is materialised or
  sorted, so a fused score (METHOD.md "Inference score") can be produced block by block. Pass 1 reads
  the blocks holding each caption's own cell (the "positive" cells); pass 2 reads every block once and
  counts, for both directions at once, how many candidates come before each query's target.
  `score_block` must be deterministic: the same (text_slice, item_slice) must give the same values
  (both passes use the same block grid, so a cell is always computed within the same block).
  A block is counted on CPU by the compiled one-pass kernel of `leccr.evaluation.rank_kernel`, on a GPU with
  torch ops (`_count_block_torch`); the tests run both against `naive_ranks`.

Metric names follow open_clip (`image_to_text_R@{k}`): `text_to_visual_R@1`, ..., `sumr`.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor

import numpy as np
import torch

# score_block(text_slice, item_slice) -> float tensor [len(text_slice), len(item_slice)]
ScoreBlock = Callable[[slice, slice], torch.Tensor]

DEFAULT_KS = (1, 5, 10)
DIRECTIONS = ("text_to_visual", "visual_to_text")


def _blocks(n: int, chunk: int) -> list[slice]:
    if chunk < 1:
        raise ValueError(f"chunk size must be >= 1, got {chunk}")
    return [slice(start, min(start + chunk, n)) for start in range(0, n, chunk)]


def _check_text_item(text_item, n_items: int) -> torch.Tensor:
    """text_item as an int64 CPU tensor [N_t], each in [0, n_items)."""
    text_item = torch.as_tensor(np.asarray(text_item), dtype=torch.int64).reshape(-1)
    if text_item.numel() == 0:
        raise ValueError("no texts to evaluate: text_item is empty")
    if n_items < 1:
        raise ValueError(f"no visual items to evaluate: n_items={n_items}")
    low, high = int(text_item.min()), int(text_item.max())
    if low < 0 or high >= n_items:
        bad = int(torch.nonzero((text_item < 0) | (text_item >= n_items))[0])
        raise ValueError(f"text {bad} belongs to item {int(text_item[bad])}, outside [0, {n_items})")
    return text_item


def _as_scores(values: torch.Tensor) -> torch.Tensor:
    """`values` in the dtype ranks compare them in: float64 as it is, any other dtype as float32 (exact
    for float16 and bfloat16). Casting float64 down would tie scores that differ past float32's 24 bits."""
    return values if values.dtype == torch.float64 else values.float()


def _check_shape(block: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
    expected = (rows.stop - rows.start, cols.stop - cols.start)
    if tuple(block.shape) != expected:
        raise ValueError(f"score_block(texts {rows.start}:{rows.stop}, items {cols.start}:{cols.stop}) returned "
                         f"shape {tuple(block.shape)}, expected {expected}")
    return _as_scores(block)


def _raise_if_nan(values: torch.Tensor, first_text: int, first_item: int) -> None:
    """A NaN compares false with everything and would silently get rank 1: name the first one.
    values [texts, items] starting at (first_text, first_item); sum() is a cheap screen."""
    if not torch.isfinite(values.sum()) and torch.isnan(values).any():
        where = torch.nonzero(torch.isnan(values))[0]
        raise ValueError(f"score_block returned NaN at text {first_text + int(where[0])}, "
                         f"item {first_item + int(where[1])}")


def _check_block(block: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
    block = _check_shape(block, rows, cols)
    _raise_if_nan(block, rows.start, cols.start)
    return block


# ----------------------------------------------------------------------------- naive reference

def naive_ranks(scores: torch.Tensor, text_item) -> tuple[np.ndarray, np.ndarray]:
    """Ranks from the whole matrix with a full stable argsort per query.

    scores [N_t, N_v]; text_item [N_t] -> (text_to_visual ranks [N_t], visual_to_text ranks [N_v]),
    int64, 1-based; 0 for items with no caption.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be [N_t, N_v], got shape {tuple(scores.shape)}")
    n_texts, n_items = scores.shape
    text_item = _check_text_item(text_item, n_items)
    if text_item.numel() != n_texts:
        raise ValueError(f"text_item has {text_item.numel()} entries for {n_texts} score rows")
    scores = _as_scores(scores)
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")

    # text -> visual: position of the caption's own item in its row's sorted order
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices        # [N_t, N_v]
    t2v = (order == text_item[:, None]).to(torch.int8).argmax(dim=1) + 1
    del order
    # visual -> text: first position in the column's sorted order holding one of the item's captions
    order = torch.sort(scores.T, dim=1, descending=True, stable=True).indices      # [N_v, N_t]
    hit = text_item[order] == torch.arange(n_items)[:, None]
    del order
    has_caption = torch.bincount(text_item, minlength=n_items) > 0
    v2t = torch.where(has_caption, hit.to(torch.int8).argmax(dim=1) + 1, 0)
    return t2v.numpy(), v2t.numpy()


# ----------------------------------------------------------------------------- chunked path

# Rows of a block compared at a time: the comparison results of a tile (tile x item_chunk floats,
# 256 rows at 4096 items) stay in cache for the counting product, and one tile serves both
# directions, so each block is read from memory about once after the score_block call wrote it.
# Measured on 2 shared cores (bench_recall, 20k x 20k): 0.25-4 MiB tiles count a 4096 x 4096 block
# equally fast on a quiet machine; on a loaded one each small multi-threaded op waits for a
# descheduled thread, so fewer, larger tiles win (1 MiB: 25x the bare blocks, 4 MiB: 9.6x, at load 9).
TILE_BYTES = 4 * 2**20


@torch.no_grad()
def chunked_ranks(score_block: ScoreBlock, text_item, n_items: int, text_chunk: int = 4096,
                  item_chunk: int = 4096, device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """The ranks of `naive_ranks`, reading the matrix only through `score_block`, block by block.

    text_item [N_t] -> (text_to_visual ranks [N_t], visual_to_text ranks [N_v]); same conventions as
    `naive_ranks`. Memory is O(text_chunk * item_chunk + N_t + N_v). `score_block` is called with
    the same grid of slices in both passes; blocks are moved to `device` (counting runs there).
    Each block is counted once; a block of pass 1 is counted there (and not read again) as soon as
    every target it is compared with is known, so captions grouped by item read each block once.
    """
    device = torch.device(device)
    text_item = _check_text_item(text_item, n_items)
    n_texts = text_item.numel()
    text_blocks, item_blocks = _blocks(n_texts, text_chunk), _blocks(n_items, item_chunk)
    own_item = text_item.to(device)
    positive: torch.Tensor | None = None  # each caption's own score, in the dtype of the first block read
    t2v_before = torch.zeros(n_texts, dtype=torch.int64, device=device)
    v2t_before = torch.zeros(n_items, dtype=torch.int64, device=device)

    threads = torch.get_num_threads() if device.type == "cpu" else 1
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="leccr-ranks") as pool:  # threads start on use

        def count(block: torch.Tensor, rows: slice, cols: slice, best: tuple[torch.Tensor, torch.Tensor]) -> None:
            t2v, v2t = _count_block(block, rows, cols, positive[rows], own_item[rows], *best, n_texts, pool,
                                    threads)
            t2v_before[rows] += t2v
            v2t_before[cols] += v2t

        # pass 1: each caption's own score, read from the blocks holding the positive cells only
        # (captions grouped by item -> about one block per text chunk; scattered -> up to every block)
        item_block_of = (text_item // item_chunk).tolist()
        positive_blocks = [sorted(set(item_block_of[rows])) for rows in text_blocks]
        rows_waiting = [len(blocks) for blocks in positive_blocks]   # positive blocks of a text chunk not yet read
        cols_waiting = Counter(c for blocks in positive_blocks for c in blocks)  # same, per item chunk
        counted = set()
        for r, rows in enumerate(text_blocks):
            own = own_item[rows]
            for c in positive_blocks[r]:
                cols = item_blocks[c]
                block = _check_shape(score_block(rows, cols).to(device), rows, cols)
                if positive is None:
                    positive = torch.empty(n_texts, dtype=block.dtype, device=device)
                _check_dtype(block, positive, rows, cols)
                local = torch.nonzero((own >= cols.start) & (own < cols.stop)).squeeze(1)
                positive[rows.start + local] = block[local, own[local] - cols.start]
                rows_waiting[r] -= 1
                cols_waiting[c] -= 1
                if rows_waiting[r] == 0 and cols_waiting[c] == 0:
                    # this block's text targets and item targets are all known: count it now
                    count(block, rows, cols, _best_captions(positive, own_item, cols))
                    counted.add((r, c))

        # pass 2: every block not counted yet, once
        best = _best_captions(positive, own_item, slice(0, n_items))
        for r, rows in enumerate(text_blocks):
            for c, cols in enumerate(item_blocks):
                if (r, c) not in counted:
                    block = _check_shape(score_block(rows, cols).to(device), rows, cols)
                    _check_dtype(block, positive, rows, cols)
                    count(block, rows, cols, (best[0][cols], best[1][cols]))
        has_caption = best[1] < n_texts
        t2v = t2v_before + 1
        v2t = torch.where(has_caption, v2t_before + 1, 0)
        return t2v.cpu().numpy(), v2t.cpu().numpy()


def _check_dtype(block: torch.Tensor, positive: torch.Tensor, rows: slice, cols: slice) -> None:
    """Every block must come in one dtype: a float32 block compared with float64 targets (or the other
    way round) would rank a cell by a value it was not computed as."""
    if block.dtype != positive.dtype:
        raise ValueError(f"score_block(texts {rows.start}:{rows.stop}, items {cols.start}:{cols.stop}) returned "
                         f"{block.dtype}, earlier blocks {positive.dtype}: every block must have one dtype")


def _best_captions(positive: torch.Tensor, own_item: torch.Tensor, items: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """The visual->text target of each item in `items`: (its best caption's score, that caption's index).

    Best = highest positive score, lowest index among ties (the first of its captions in the stable
    order). An item without caption gets (+inf, N_t): nothing comes before it, and it is no query.
    """
    n_texts, n = positive.numel(), items.stop - items.start
    texts = torch.nonzero((own_item >= items.start) & (own_item < items.stop)).squeeze(1)
    local_item = own_item[texts] - items.start
    best_score = torch.full((n,), -torch.inf, dtype=positive.dtype, device=positive.device).scatter_reduce(
        0, local_item, positive[texts], reduce="amax")
    is_best = positive[texts] == best_score[local_item]
    best_text = torch.full((n,), n_texts, dtype=torch.int64, device=positive.device).scatter_reduce(
        0, local_item[is_best], texts[is_best], reduce="amin")
    return torch.where(best_text < n_texts, best_score, torch.inf), best_text


def _count_block(block: torch.Tensor, rows: slice, cols: slice, text_target: torch.Tensor, text_target_index: torch.Tensor,
                 item_target: torch.Tensor, item_target_index: torch.Tensor,
                 n_texts: int, pool: Executor | None = None, threads: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per text of `rows` and per item of `cols`, how many candidates of this block come before the
    query's target in the stable descending order: (text->visual counts [rows], visual->text counts [cols]).

    text_target [rows]: each text's own score, at item index text_target_index; item_target [cols]:
    each item's best caption score, at text index item_target_index (N_t for no caption).
    On CPU: the compiled one-pass kernel of `leccr.evaluation.rank_kernel`, rows split over `threads` threads of
    `pool`. Elsewhere (a GPU), or with a target of -inf: `_count_block_torch`.
    """
    if block.device.type == "cpu" and not (torch.isneginf(text_target).any() or torch.isneginf(item_target).any()):
        from leccr.evaluation.rank_kernel import count_block

        values = block.numpy()
        text_counts, item_counts, nan_row = count_block(
            values, rows.start, cols.start, text_target.numpy(), text_target_index.numpy(), item_target.numpy(),
            item_target_index.numpy(), pool, threads)
        if nan_row >= 0:
            _raise_if_nan(block[nan_row:nan_row + 1], rows.start + nan_row, cols.start)
        return torch.from_numpy(text_counts), torch.from_numpy(item_counts)
    return _count_block_torch(block, rows, cols, text_target, text_target_index, item_target, item_target_index,
                              n_texts)


def _count_block_torch(block: torch.Tensor, rows: slice, cols: slice, text_target: torch.Tensor,
                       text_target_index: torch.Tensor, item_target: torch.Tensor, item_target_index: torch.Tensor,
                       n_texts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`_count_block` with torch ops on the block's device. The block is compared tile by tile; each
    tile serves both directions while it is in cache."""
    n_rows, n_cols = block.shape
    device = block.device
    tile = max(1, TILE_BYTES // (4 * n_cols))
    text_counts = torch.empty(n_rows, device=device)
    item_counts = torch.zeros(n_cols, device=device)
    ones, tile_ones = torch.ones(n_cols, device=device), torch.ones(tile, device=device)
    item_index = torch.arange(cols.start, cols.stop, device=device)[None, :]
    valid = item_target_index[item_target_index < n_texts]   # items without caption: no query, any count
    item_lo = int(valid.min()) if valid.numel() else n_texts
    item_hi = int(valid.max()) if valid.numel() else n_texts
    buffer, ties = torch.empty(tile, n_cols, device=device), torch.empty(tile, n_cols, device=device)
    for start in range(0, n_rows, tile):
        stop = min(start + tile, n_rows)
        values = block[start:stop]
        _raise_if_nan(values, rows.start + start, cols.start)
        out, tie = buffer[:stop - start], ties[:stop - start]
        own = text_target_index[start:stop, None]
        _comes_first(values, text_target[start:stop, None], cols.start, cols.stop, item_index, own,
                     int(own.min()), int(own.max()), out, tie)
        torch.mv(out, ones, out=text_counts[start:stop])
        text_index = torch.arange(rows.start + start, rows.start + stop, device=device)[:, None]
        _comes_first(values, item_target[None, :], rows.start + start, rows.start + stop, text_index,
                     item_target_index[None, :], item_lo, item_hi, out, tie)
        item_counts.addmv_(out.T, tile_ones[:stop - start])
    # counts of 0./1. floats are exact: a block's count stays far below 2**24
    return text_counts.round().to(torch.int64), item_counts.round().to(torch.int64)


def _comes_first(values: torch.Tensor, target: torch.Tensor, start: int, stop: int, index: torch.Tensor,
                 target_index: torch.Tensor, target_lo: int, target_hi: int, out: torch.Tensor,
                 tie: torch.Tensor) -> None:
    """out = 1. where a candidate comes before the query's target, else 0.: it scores higher, or equal
    with a lower index. Candidates [start, stop) run along `index` (broadcast against values);
    target and target_index broadcast the other way. When every candidate index lies below (above)
    every target index, "equal" counts (doesn't) for all, and the tie test is skipped.

    Written straight as floats, summed by a matrix-vector product: about 6x faster on CPU than
    summing a bool tensor (which widens to int64)."""
    if stop <= target_lo:
        torch.ge(values, target, out=out)
    elif start > target_hi:
        torch.gt(values, target, out=out)
    else:
        torch.gt(values, target, out=out)
        torch.eq(values, target, out=tie).mul_(index < target_index)
        out.add_(tie)


# ----------------------------------------------------------------------------- metrics from ranks

def recall_metrics(t2v_ranks, v2t_ranks, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """R@K (percent), mean and median rank both ways, and SumR (sum of the R@K of both directions).

    t2v_ranks [N_t] >= 1; v2t_ranks [N_v] >= 0 where 0 marks an item without caption (left out).
    Median rank as the papers count it: their `itm_eval` reports `floor(median(ranks0)) + 1` over
    0-based ranks, i.e. floor(median) of our 1-based ranks: on an even count the mean of the two
    middle ranks rounded down (ranks 1, 2 -> 1, where numpy's median says 1.5). Keys:
    `text_to_visual_R@{k}`, `text_to_visual_mean_rank`, `text_to_visual_median_rank`,
    `text_to_visual_queries`, the same for `visual_to_text_`, and `sumr`.
    """
    metrics: dict[str, float] = {}
    sumr = 0.0
    for direction, ranks in zip(DIRECTIONS, (t2v_ranks, v2t_ranks)):
        ranks = np.asarray(ranks, dtype=np.int64)
        ranks = ranks[ranks > 0]
        if ranks.size == 0:
            raise ValueError(f"{direction}: no query with a target (every rank is 0)")
        for k in ks:
            recall = 100.0 * float(np.mean(ranks <= k))
            metrics[f"{direction}_R@{k}"] = recall
            sumr += recall
        metrics[f"{direction}_mean_rank"] = float(np.mean(ranks))
        metrics[f"{direction}_median_rank"] = float(np.floor(np.median(ranks - 1)) + 1)
        metrics[f"{direction}_queries"] = float(ranks.size)
    metrics["sumr"] = sumr
    return metrics


def chance_sumr(text_item, n_items: int, ks: Sequence[int] = DEFAULT_KS) -> float:
    """Expected SumR of a uniformly random ranking, for reading small test sets.

    text->visual: a caption's one item is within K of N_v with probability min(K, N_v) / N_v.
    visual->text: item j with c_j of the N_t captions is found within K with probability
    1 - C(N_t - c_j, K) / C(N_t, K) (no caption among the first K); items without captions are left
    out, as in `recall_metrics`.
    """
    from math import comb

    text_item = np.asarray(text_item, dtype=np.int64)
    n_texts = len(text_item)
    counts = np.bincount(text_item, minlength=n_items)
    counts = counts[counts > 0]
    total = 0.0
    for k in ks:
        total += 100.0 * min(k, n_items) / n_items
        miss = [comb(n_texts - c, k) / comb(n_texts, k) if k <= n_texts else 0.0 for c in counts]
        total += 100.0 * float(np.mean([1.0 - m for m in miss]))
    return total


def naive_retrieval_metrics(scores: torch.Tensor, text_item, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """`recall_metrics` of `naive_ranks` (whole matrix, full argsort)."""
    return recall_metrics(*naive_ranks(scores, text_item), ks=ks)


def chunked_retrieval_metrics(score_block: ScoreBlock, text_item, n_items: int, ks: Sequence[int] = DEFAULT_KS,
                              text_chunk: int = 4096, item_chunk: int = 4096,
                              device: str | torch.device = "cpu") -> dict[str, float]:
    """`recall_metrics` of `chunked_ranks` (block by block)."""
    return recall_metrics(*chunked_ranks(score_block, text_item, n_items, text_chunk, item_chunk, device), ks=ks)


# ----------------------------------------------------------------------------- block helpers

def matrix_score_block(scores: torch.Tensor) -> ScoreBlock:
    """A score_block over a matrix already in memory (tests, small splits)."""
    return lambda rows, cols: scores[rows, cols]


def embedding_score_block(text_emb: torch.Tensor, visual_emb: torch.Tensor) -> ScoreBlock:
    """score_block of dot products: text_emb [N_t, E], visual_emb [N_v, E] -> block [rows, cols]."""
    return lambda rows, cols: text_emb[rows] @ visual_emb[cols].T


@torch.no_grad()
def matrix_min_max(score_block: ScoreBlock, n_texts: int, n_items: int, text_chunk: int = 4096,
                   item_chunk: int = 4096, device: str | torch.device = "cpu") -> tuple[float, float]:
    """Global (min, max) of the N_t x N_v matrix defined by `score_block`, one pass over the blocks.

    The fused score's minmax is over the whole test matrix (METHOD.md quirk 3): run this once per
    matrix (global and slot) before scoring blocks of the fused score.
    """
    low, high = torch.inf, -torch.inf
    for rows in _blocks(n_texts, text_chunk):
        for cols in _blocks(n_items, item_chunk):
            block = _check_block(score_block(rows, cols).to(device), rows, cols)
            low, high = min(low, float(block.min())), max(high, float(block.max()))
    return low, high


@torch.no_grad()
def _topk_rows(score_block: ScoreBlock, n_rows: int, n_cols: int, k: int, row_chunk: int, col_chunk: int,
               device: torch.device, queries: Sequence[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k columns of each row (or of the given rows), best first, ties to the lower column index."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, n_cols)
    row_blocks = (_blocks(n_rows, row_chunk) if queries is None
                  else [slice(int(q), int(q) + 1) for q in queries])
    values_out, index_out = [], []
    for rows in row_blocks:
        if not 0 <= rows.start < n_rows:
            raise ValueError(f"query {rows.start} outside [0, {n_rows})")
        best_values = torch.empty(rows.stop - rows.start, 0, device=device)
        best_index = torch.empty(rows.stop - rows.start, 0, dtype=torch.int64, device=device)
        for cols in _blocks(n_cols, col_chunk):
            block = _as_scores(score_block(rows, cols).to(device))
            best_values = best_values.to(block.dtype)  # float64 scores stay float64 (empty at the first block)
            # stable sort: among equal scores the lower column index first, as in the full sort;
            # the running best (lower indices) goes first in the merge, so stability carries over
            sorted_block = torch.sort(block, dim=1, descending=True, stable=True)
            values = torch.cat([best_values, sorted_block.values[:, :k]], dim=1)
            index = torch.cat([best_index, sorted_block.indices[:, :k] + cols.start], dim=1)
            merged = torch.sort(values, dim=1, descending=True, stable=True)
            best_values = merged.values[:, :k]
            best_index = torch.gather(index, 1, merged.indices[:, :k])
        values_out.append(best_values.cpu())
        index_out.append(best_index.cpu())
    return torch.cat(values_out), torch.cat(index_out)


def topk_items(score_block: ScoreBlock, n_texts: int, n_items: int, k: int, text_chunk: int = 4096,
               item_chunk: int = 4096, device: str | torch.device = "cpu",
               texts: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k items per text query, best first: (scores [Q, k], item indices [Q, k]) for all texts or
    the given `texts` (Q of them). Ties go to the lower item index (the stable full sort's order)."""
    check = (lambda rows, cols: _check_block(score_block(rows, cols), rows, cols))
    return _topk_rows(check, n_texts, n_items, k, text_chunk, item_chunk, torch.device(device), texts)


def topk_texts(score_block: ScoreBlock, n_texts: int, n_items: int, k: int, text_chunk: int = 4096,
               item_chunk: int = 4096, device: str | torch.device = "cpu",
               items: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k texts per visual query, best first: (scores [Q, k], text indices [Q, k]) for all items or
    the given `items`. Ties go to the lower text index."""
    transposed = (lambda rows, cols: _check_block(score_block(cols, rows), cols, rows).T)
    return _topk_rows(transposed, n_items, n_texts, k, item_chunk, text_chunk, torch.device(device), items)
