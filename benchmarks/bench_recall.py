"""Chunked exact ranks vs the reference code's full-matrix argsort, on the same random N x N scores.

    python benchmarks/bench_recall.py [--n 20000] [--big 100000] [--chunk 4096] [--dim 64]

1. naive: the whole N x N score matrix, a full stable argsort per query both ways (leccr.evaluation.metrics.naive_ranks);
2. chunked: the same scores block by block (leccr.evaluation.metrics.chunked_ranks), never materialised;
   asserts identical metrics, prints the time ratio and the peak-memory ratio;
3. score blocks alone: the same grid of score_block calls as the chunked path, no ranking (timed in
   the chunked child, alternated with the ranks again, best of each); prints
   chunked / blocks alone, the cost of ranking over the bare GEMM (goal <= 1.2x; the figure falls as
   --dim grows, since the GEMM grows with it and the counting does not: 256 is the models' embed_dim);
4. a --big x --big chunked evaluation with scores produced blockwise from random embeddings (time only).

Each path runs in its own subprocess so its peak RSS (resource.getrusage, ru_maxrss) is its own; the
RSS after imports and data set-up is printed too, so the ratio of the increments can be read as well.
The N x N scores are dot products of small-integer embeddings, exact in float32 whatever the block
shape or summation order, so both paths see bit-identical scores (with plenty of ties).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # ru_maxrss is KiB on Linux


def exact_embeddings(n: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(text [n, dim], visual [n, dim], text_item [n]): one caption per item, caption = item + noise,
    small integers so every dot product is an exact float32 integer."""
    generator = torch.Generator().manual_seed(seed)
    visual = torch.randint(-4, 5, (n, dim), generator=generator).float()
    text_item = torch.arange(n)
    text = visual[text_item] + torch.randint(-6, 7, (n, dim), generator=generator).float()
    return text, visual, text_item


def child(argv: list[str]) -> None:
    """One path in this process; prints one JSON line."""
    from leccr.evaluation.metrics import _blocks, chunked_ranks, embedding_score_block, naive_ranks, recall_metrics

    parser = argparse.ArgumentParser()
    parser.add_argument("--path", choices=["naive", "chunked", "big"], required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--dim", type=int, required=True)
    parser.add_argument("--chunk", type=int, required=True)
    args = parser.parse_args(argv)

    if args.path == "big":
        # normalised random embeddings, several captions for some items, none for others
        generator = torch.Generator().manual_seed(1)
        visual = torch.nn.functional.normalize(torch.randn(args.n, args.dim, generator=generator), dim=1)
        text_item = torch.sort(torch.randint(0, args.n, (args.n,), generator=generator)).values
        text = torch.nn.functional.normalize(visual[text_item] + 0.7 * torch.randn(args.n, args.dim,
                                                                                   generator=generator), dim=1)
    else:
        text, visual, text_item = exact_embeddings(args.n, args.dim)
    setup_rss = _rss_mib()
    start = time.perf_counter()
    if args.path == "naive":
        ranks = naive_ranks(text @ visual.T, text_item)
    else:
        ranks = chunked_ranks(embedding_score_block(text, visual), text_item, args.n, args.chunk, args.chunk)
    seconds = time.perf_counter() - start
    result = {"metrics": recall_metrics(*ranks), "seconds": seconds, "peak_rss_mib": _rss_mib(),
              "setup_rss_mib": setup_rss}
    if args.path == "chunked":
        # the score blocks alone (same grid, no ranking) vs the ranks again, alternated in this process so
        # that a change of machine load hits both; best of two each
        score_block = embedding_score_block(text, visual)
        blocks_alone, ranked = [], [seconds]
        for _ in range(2):
            start = time.perf_counter()
            for rows in _blocks(args.n, args.chunk):
                for cols in _blocks(args.n, args.chunk):
                    score_block(rows, cols)
            blocks_alone.append(time.perf_counter() - start)
            start = time.perf_counter()
            chunked_ranks(score_block, text_item, args.n, args.chunk, args.chunk)
            ranked.append(time.perf_counter() - start)
        result.update(blocks_alone_seconds=min(blocks_alone), ranked_seconds=min(ranked))
    print(json.dumps(result))


def run_child(path: str, n: int, dim: int, chunk: int) -> dict:
    command = [sys.executable, __file__, "--child", "--path", path, "--n", str(n), "--dim", str(dim),
               "--chunk", str(chunk)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{path} child failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare_naive(naive: dict, chunked: dict) -> None:
    if naive["metrics"] != chunked["metrics"]:
        raise AssertionError(f"metrics differ:\nnaive   {naive['metrics']}\nchunked {chunked['metrics']}")
    print("identical metrics:", json.dumps({k: round(v, 4) for k, v in naive["metrics"].items()}))
    for name, result in (("naive (full argsort)", naive), ("chunked", chunked)):
        print(f"  {name:22s} {result['seconds']:8.2f} s   peak RSS {result['peak_rss_mib']:8.0f} MiB "
              f"(after set-up {result['setup_rss_mib']:.0f} MiB)")
    naive_extra = naive["peak_rss_mib"] - naive["setup_rss_mib"]
    chunked_extra = chunked["peak_rss_mib"] - chunked["setup_rss_mib"]
    print(f"time ratio naive/chunked: {naive['seconds'] / chunked['seconds']:.2f}x")
    print(f"peak RSS ratio naive/chunked: {naive['peak_rss_mib'] / chunked['peak_rss_mib']:.2f}x "
          f"(increment over set-up: {naive_extra:.0f} vs {chunked_extra:.0f} MiB, "
          f"{naive_extra / max(chunked_extra, 1.0):.1f}x)")


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--child":
        child(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="texts = items for the naive vs chunked comparison")
    parser.add_argument("--big", type=int, default=100000, help="texts = items for the chunked-only timing (0: skip)")
    parser.add_argument("--dim", type=int, default=64, help="embedding width")
    parser.add_argument("--chunk", type=int, default=4096, help="text and item chunk size of the chunked path")
    parser.add_argument("--no-naive", action="store_true", help="skip the full-argsort path (minutes at 20k)")
    args = parser.parse_args(argv)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; N={args.n}, dim={args.dim}, "
          f"chunk={args.chunk}")
    chunked = run_child("chunked", args.n, args.dim, args.chunk)
    print(f"score blocks alone (same {args.chunk} x {args.chunk} grid, no ranking): {chunked['blocks_alone_seconds']:.2f} s, "
          f"chunked ranks {chunked['ranked_seconds']:.2f} s (best of each, alternated in one process): "
          f"chunked / blocks alone {chunked['ranked_seconds'] / chunked['blocks_alone_seconds']:.2f}x")
    if not args.no_naive:
        compare_naive(run_child("naive", args.n, args.dim, args.chunk), chunked)
    if args.big:
        big = run_child("big", args.big, args.dim, args.chunk)
        print(f"chunked {args.big} x {args.big}: {big['seconds']:.1f} s, peak RSS {big['peak_rss_mib']:.0f} MiB; "
              f"SumR {big['metrics']['sumr']:.2f}, text_to_visual_R@1 {big['metrics']['text_to_visual_R@1']:.2f}, "
              f"visual_to_text queries {int(big['metrics']['visual_to_text_queries'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
