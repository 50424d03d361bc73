"""Search speed: exact vs FAISS IVF / HNSW per query, ANN recall@10, and end-to-end HTTP through `leccr serve`.

    python benchmarks/bench_search.py [--sizes 100000 1000000] [--dim 256] [--queries 200]
                                      [--hnsw-max 100000] [--http-items 100000] [--http-requests 100]

1. Vectors (synthetic, the paper models' joint width 256): N unit vectors around --concepts centres
   (default 1000, at every N: a bigger collection holds more of each kind of scene), each item its
   centre + noise of 1.2x its norm (a collection's embeddings cluster by what they show;
   uniform random vectors have no neighbourhoods, a worst case no real index sees); queries = an item +
   noise of 1.5x its norm, so a query's best item scores ~0.55 and its 10th ~0.29 (a caption's
   cosine with its image in a trained joint space is of that order, not a near-duplicate's).
   Per query, one at a time as a server answers them: latency p50/p95 and queries/s of exact search
   (`ExactIndex`: one matrix product + partial sort), FAISS IVF and HNSW at the config defaults
   (`IvfConfig()`, `HnswConfig()`); recall@10 of each against exact; build seconds; ratios to exact.
   HNSW is built only up to --hnsw-max items (its build is the slow part on a small CPU).
2. HTTP: an index of --http-items synthetic items with slots (a fused score, alpha 0.9) and a tiny
   random-weight LECCR model of width 256 whose text side encodes the queries; `leccr serve`'s app under
   uvicorn on 127.0.0.1 (loopback only): one client's latency, then a bounded load test (--http-clients
   threads, --http-requests requests in all); the ratio to the same searches called in-process.
   The tiny text encoder (2 layers) makes query encoding cheap; mBERT (12 layers) adds its own
   forward time per query on a CPU.
"""
from __future__ import annotations

import argparse
import json
import socket
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from leccr.config import HnswConfig, IvfConfig
from leccr.vectors import ExactIndex, build_faiss, faiss_missing

K = 10


def clustered(n: int, dim: int, seed: int, centres: np.ndarray | None = None, concepts: int = 1000
              ) -> tuple[np.ndarray, np.ndarray]:
    """(unit vectors [n, dim] float32, the centres), built in blocks so 1M x 256 stays at ~1 GiB."""
    rng = np.random.default_rng(seed)
    if centres is None:
        centres = rng.standard_normal((concepts, dim)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        rows = min(100_000, n - start)
        block = centres[rng.integers(0, len(centres), rows)] + rng.standard_normal((rows, dim)).astype(
            np.float32) * np.float32(1.2 / np.sqrt(dim))
        out[start:start + rows] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out, centres


def near(items: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Queries: random items plus noise of 1.5x their norm, normalised."""
    rng = np.random.default_rng(seed)
    picked = items[rng.integers(0, len(items), count)]
    noisy = picked + rng.standard_normal(picked.shape).astype(np.float32) * np.float32(1.5 / np.sqrt(items.shape[1]))
    return (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)


def per_query(index, queries: np.ndarray) -> tuple[list[float], np.ndarray]:
    """Seconds of each single-query search, and the rows found."""
    times, found = [], []
    for query in queries:
        started = time.perf_counter()
        _, rows = index.search(query[None], K)
        times.append(time.perf_counter() - started)
        found.append(rows[0])
    return times, np.stack(found)


def summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {"p50_ms": 1e3 * ordered[len(ordered) // 2], "p95_ms": 1e3 * ordered[int(0.95 * (len(ordered) - 1))],
            "qps": len(times) / sum(times)}


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth)]))


def bench_vectors(n: int, dim: int, n_queries: int, hnsw_max: int, concepts: int) -> None:
    started = time.perf_counter()
    items, _ = clustered(n, dim, seed=0, concepts=concepts)
    queries = near(items, n_queries, seed=1)
    print(f"\n== {n:,} items x {dim} around {concepts} centres (data {time.perf_counter() - started:.1f}s), "
          f"{n_queries} queries, top {K}")
    exact = ExactIndex(items)
    exact_times, truth = per_query(exact, queries)
    base = summary(exact_times)
    rows = [("exact", base, 1.0, 0.0)]
    missing = faiss_missing()
    configs = [] if missing else [IvfConfig()] + ([HnswConfig()] if n <= hnsw_max else [])
    for config in configs:
        built = time.perf_counter()
        index = build_faiss(items, config)
        build_s = time.perf_counter() - built
        times, found = per_query(index, queries)
        rows.append((index.kind, summary(times), recall(found, truth), build_s))
        del index
    for name, stats, hit_rate, build_s in rows:
        print(f"  {name:<11} p50 {stats['p50_ms']:7.2f} ms  p95 {stats['p95_ms']:7.2f} ms  {stats['qps']:8.1f} q/s  "
              f"recall@{K} {hit_rate:.3f}  build {build_s:6.1f}s  "
              f"p95 x{stats['p95_ms'] / base['p95_ms']:.3f} of exact, q/s x{stats['qps'] / base['qps']:.1f}")
    if missing:
        print(f"  (FAISS rows left out: {missing})")
    elif n > hnsw_max:
        print(f"  (HNSW left out above --hnsw-max {hnsw_max:,} items: its build dominates on this CPU)")


# ----------------------------------------------------------------------------------------- HTTP
def synthetic_index(folder: Path, n: int, dim: int, slots: int) -> tuple[Path, Path, list[str]]:
    """(index folder, train folder, queries): a tiny LECCR model of width `dim` and `n` synthetic items."""
    import pyarrow as pa
    import torch

    from leccr.models import create_model
    from leccr.tiny_models.text import build_text_encoder
    from leccr.training.checkpoint import save_model, save_text_encoder
    from leccr.schemas.core import write_table
    from leccr.schemas.index import INDEX_ITEMS, embeddings_schema

    words = ["ein", "Hund", "rennt", "durch", "den", "Schnee", "eine", "Katze", "schläft", "auf", "dem", "Sofa",
             "a", "dog", "runs", "through", "the", "snow", "red", "blue", "circle", "square", "rot", "blau"]
    rng = np.random.default_rng(3)
    corpus = [" ".join(rng.choice(words, 6)) for _ in range(300)]
    encoder = build_text_encoder(folder / "text_encoder", corpus, seed=0)
    torch.manual_seed(0)
    model = create_model("leccr-image-tiny", text_encoder_path=encoder, embed_dim=dim, num_slots=slots).eval()
    method_dir = folder / "train" / "leccr"
    method_dir.mkdir(parents=True)
    save_model(model, method_dir, "leccr")
    save_text_encoder(encoder, method_dir)
    vectors, centres = clustered(n, dim, seed=0)
    slot_values = clustered(n * slots, dim, seed=2, centres=centres)[0].reshape(n, slots * dim)
    index_dir = folder / "index"
    ids = [f"item{i:07d}" for i in range(n)]
    write_table(pa.Table.from_pylist([{"item_id": i, "split": "test", "media_type": "image", "path": None,
                                       "captions": [{"lang": "en", "kind": "human", "text": "synthetic"}],
                                       "description": None} for i in ids], schema=INDEX_ITEMS),
                index_dir / "items.parquet", INDEX_ITEMS)
    (index_dir / "leccr").mkdir(parents=True)
    write_table(pa.table({"method": ["leccr"] * n, "item_id": ids, "split": ["test"] * n, "path": pa.array([None] * n, pa.string()),
                          "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
                          "slots": pa.FixedSizeListArray.from_arrays(pa.array(slot_values.reshape(-1)), slots * dim)}),
                index_dir / "leccr" / "embeddings.parquet", embeddings_schema(dim, slots * dim))
    info = {"method": "leccr", "alpha": 0.9, "embed_dim": dim, "num_slots": slots, "items": n,
            "languages": ["en", "de"], "max_length": 48, "calibration_split": "test",
            "ranges": {"*": {"global": [-1.0, 1.0], "slot": [-1.0, 1.0]}}, "ann": None}
    (index_dir / "leccr" / "index.json").write_text(json.dumps(info))
    return index_dir, folder / "train", corpus


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def bench_http(n: int, dim: int, requests: int, clients: int) -> None:
    import uvicorn

    from leccr.search import SearchEngine
    from leccr.search.server import create_app

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        index_dir, train_dir, corpus = synthetic_index(Path(tmp), n, dim, slots=4)
        engine = SearchEngine(index_dir, train_dir, None, "cpu")
        engine.method("leccr")
        print(f"\n== HTTP: {n:,} items x {dim} + 4 slots, fused score, exact candidates (200), k {K} "
              f"(set-up {time.perf_counter() - started:.1f}s)")
        queries = [corpus[i % len(corpus)] for i in range(requests)]
        for text in queries[:10]:  # warm-up: first forward passes, allocator, caches
            engine.search([text], "de", "leccr", K)
        def in_process() -> list[float]:
            times = []
            for text in queries:
                began = time.perf_counter()
                engine.search([text], "de", "leccr", K)
                times.append(time.perf_counter() - began)
            return times

        # In a worker thread, as the server's handlers run: on a loaded 2-core machine torch's text
        # encoder was ~10x slower when called from the main thread (its 2 intra-op threads wait on
        # each other), which would make HTTP look faster than the call it wraps.
        with ThreadPoolExecutor(1) as worker:
            direct = worker.submit(in_process).result()
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="error"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)

        def ask(text: str) -> float:
            url = f"http://127.0.0.1:{port}/api/search?" + urllib.parse.urlencode({"q": text, "lang": "de", "k": K})
            began = time.perf_counter()
            with urllib.request.urlopen(url, timeout=60) as response:
                assert len(json.loads(response.read())["hits"]) == K
            return time.perf_counter() - began

        try:
            for text in queries[:10]:
                ask(text)
            one = [ask(text) for text in queries]
            began = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                loaded = list(pool.map(ask, queries))
            wall = time.perf_counter() - began
        finally:
            server.should_exit = True
            thread.join(30)
        base = summary(direct)
        for name, times, qps in (("in-process", direct, base["qps"]), ("HTTP, 1 client", one, summary(one)["qps"]),
                                 (f"HTTP, {clients} clients", loaded, len(loaded) / wall)):
            stats = summary(times)
            print(f"  {name:<17} p50 {stats['p50_ms']:7.2f} ms  p95 {stats['p95_ms']:7.2f} ms  {qps:8.1f} q/s  "
                  f"p95 x{stats['p95_ms'] / base['p95_ms']:.2f} of in-process")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--concepts", type=int, default=1000, help="cluster centres of the synthetic collection")
    parser.add_argument("--hnsw-max", type=int, default=100_000)
    parser.add_argument("--http-items", type=int, default=100_000)
    parser.add_argument("--http-requests", type=int, default=100)
    parser.add_argument("--http-clients", type=int, default=4)
    args = parser.parse_args(argv)
    import torch

    print(f"CPU threads: torch {torch.get_num_threads()}")
    for n in args.sizes:
        bench_vectors(n, args.dim, args.queries, args.hnsw_max, args.concepts)
    if args.http_items:
        bench_http(args.http_items, args.dim, args.http_requests, args.http_clients)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
