"""Search speed: exact vs FAISS IVF / HNSW per query, ANN recall@10, and end-to-end HTTP through `leccr serve`.

    python benchmarks/bench_search.py [--sizes 100000 1000000] [--dim 256] [--queries 200]
                                      [--hnsw-max 100000] [--http-items 100000] [--http-requests 200]
                                      [--http-clients 1 4 16] [--http-rounds 3] [--http-queue-depth 8]
    python benchmarks/bench_search.py --sizes --http-items 20000 --http-requests 120    # HTTP only
    python benchmarks/bench_search.py --sizes --http-root DIR/artifacts-31014            # a real index

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
   uvicorn on 127.0.0.1 (loopback only), one server process per way of running searches
   (`serving_setups`: a thread per request as before, one worker with torch on every core, a pool of
   one-thread workers with and without batches, one process, and one process per core (`processes:
   auto`) at the overload queue depth and at the default 64). For 1, 4 and 16 clients (threads of this process
   sending --http-requests requests per cell, in --http-rounds rounds that visit every setup in turn):
   queries/s, p95, the share refused (503 past --http-queue-depth waiting searches), the server's CPU
   ms per answered query and its mean batch; the ratios to one client. The tiny text encoder (2
   layers) makes query encoding cheap; mBERT (12 layers) adds its own forward time per query on a CPU.
   Every answer is checked against the same query searched in the bench's own process (same hits).
3. --http-root: the same load test over a real index artifact (benchmarks/bench_scale.py's 31,014
   items, say), its items' captions as queries: one process against one per core.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

from leccr.config import HnswConfig, IvfConfig, ServeConfig
from leccr.engines.vectors import ExactIndex, build_faiss, faiss_missing

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


def serving_setups(cores: int, queue_depth: int) -> list[tuple[str, ServeConfig]]:
    """The ways to run searches that the HTTP part compares, the default last."""
    return [
        # What `leccr serve` did before SearchQueue: FastAPI ran each request in its thread pool (40
        # threads), each search on torch's default of one intra-op thread per core.
        ("thread per request, torch x cores", ServeConfig(processes=1, workers=40, torch_threads=cores, max_batch=1,
                                                          queue_depth=10_000)),
        ("1 worker x cores threads, batches", ServeConfig(processes=1, torch_threads=cores, queue_depth=queue_depth)),
        ("cores workers x 1 thread, no batches", ServeConfig(processes=1, workers=cores, max_batch=1,
                                                             queue_depth=queue_depth)),
        ("cores workers x 1 thread, batches", ServeConfig(processes=1, workers=cores, queue_depth=queue_depth)),
        ("1 process x 1 worker, batches", ServeConfig(processes=1, queue_depth=queue_depth)),
        *process_setups(cores, queue_depth),
    ]


def process_setups(cores: int, queue_depth: int) -> list[tuple[str, ServeConfig]]:
    """One process as before, and one per core (`processes: auto`, the default) at the overload queue
    depth and at the default depth, where 16 clients are refused nothing."""
    return [
        ("1 process, queue 64 (before)", ServeConfig(processes=1)),
        (f"{cores} processes, queue {queue_depth}", ServeConfig(processes=cores, queue_depth=queue_depth)),
        (f"{cores} processes, queue 64 (default)", ServeConfig(processes=cores)),
    ]


def _serve(open_engine, config: ServeConfig, port: int, control) -> None:
    """The server: `leccr serve`'s process model over the engine `open_engine` makes. One process (the
    app here, as `leccr serve` runs it) answers `control` with the batch sizes run so far whenever the
    bench asks between two load tests; several (`serve_on`'s processes) answer with None."""
    import torch
    import uvicorn

    from leccr.search.server import create_app, listen, serve_on

    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    if config.process_count() > 1:
        threading.Thread(target=lambda: [control.send(None) for _ in iter(control.recv, False)], daemon=True).start()
        serve_on(listen("127.0.0.1", port), open_engine, config, f"http://127.0.0.1:{port}/")
        return
    torch.set_num_threads(config.torch_threads)  # as `leccr serve` does
    engine = open_engine()
    for method in engine.methods:
        engine.method(method)
    app = create_app(engine, serving=config)

    def report() -> None:
        while control.recv():
            control.send(list(app.state.search_queue.batch_sizes))

    threading.Thread(target=report, daemon=True).start()
    uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error")).run()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of a process and every process below it (Linux /proc)."""
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:  # ended meanwhile
            continue
    return total


def load_test(port: int, pid: int, queries: list[str], clients: int, lang: str = "de") -> dict:
    """`clients` threads each sending its share of `queries` one after another (a refused one waits its
    Retry-After, then sends the next): the answered searches' seconds and hits, how many were sent, the
    wall seconds, and the server's CPU seconds (all its processes)."""
    import urllib.error

    def ask(text: str) -> tuple[float, str, list[str]] | None:
        url = f"http://127.0.0.1:{port}/api/search?" + urllib.parse.urlencode({"q": text, "lang": lang, "k": K})
        began = time.perf_counter()
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                hits = [hit["item_id"] for hit in json.loads(response.read())["hits"]]
        except urllib.error.HTTPError as error:
            if error.code != 503:
                raise
            time.sleep(int(error.headers["Retry-After"]))
            return None
        return time.perf_counter() - began, text, hits

    def client(share: list[str]) -> list:
        return [ask(text) for text in share]

    cpu, began = _cpu_seconds(pid), time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = [a for results in pool.map(client, [queries[i::clients] for i in range(clients)]) for a in results]
    answered = [a for a in answers if a is not None]
    return {"answered": [a[0] for a in answered], "hits": [(a[1], a[2]) for a in answered], "sent": len(answers),
            "wall": time.perf_counter() - began, "cpu": _cpu_seconds(pid) - cpu}


def _cell(parts: list[dict], batches: list[int]) -> dict[str, float]:
    """One table cell from its rounds: q/s, p95 of the answered, share refused, server CPU ms per answer, mean batch."""
    answered = [t for part in parts for t in part["answered"]]
    return {**summary(answered), "qps": len(answered) / sum(p["wall"] for p in parts),
            "refused": 1 - len(answered) / sum(p["sent"] for p in parts),
            "cpu_ms": 1e3 * sum(p["cpu"] for p in parts) / max(1, len(answered)),
            "batch": float(np.mean(batches)) if batches else float("nan")}


def bench_http(n: int, dim: int, requests: int, clients: list[int], queue_depth: int, rounds: int) -> None:
    import torch

    from leccr.search import SearchEngine

    cores = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        index_dir, train_dir, corpus = synthetic_index(Path(tmp), n, dim, slots=4)
        open_engine = partial(SearchEngine, index_dir, {"leccr": train_dir / "leccr"}, None, "cpu")
        print(f"\n== HTTP: {n:,} items x {dim} + 4 slots, fused score, exact candidates (200), k {K}, "
              f"{requests} requests per cell in {rounds} rounds, queue depth {queue_depth} "
              f"(set-up {time.perf_counter() - started:.1f}s)")
        queries = [corpus[i % len(corpus)] for i in range(requests)]
        serve_and_load(open_engine, queries, "de", serving_setups(cores, queue_depth), clients, rounds)


def bench_index(root: Path, experiment: str | None, requests: int, clients: list[int], queue_depth: int,
                rounds: int, lang: str) -> None:
    """The HTTP load test over a real index artifact (e.g. bench_scale's 31,014 items): queries are the
    indexed items' `lang` captions; one process as before against one per core."""
    import torch

    from leccr.search import SearchEngine

    cores = torch.get_num_threads()
    open_engine = partial(SearchEngine.open, str(root), experiment, None, "cpu")
    engine = open_engine()
    captions = [c["text"] for item in engine.items for c in item["captions"] if c["lang"] == lang]
    step = max(1, len(captions) // requests)
    queries = captions[::step][:requests]
    print(f"\n== HTTP over the index {engine.index_dir}: {len(engine.items):,} items, methods {engine.methods}, "
          f"{requests} {lang} captions as queries per cell in {rounds} rounds, k {K}, candidates 200")
    serve_and_load(open_engine, queries, lang, process_setups(cores, queue_depth), clients, rounds)


def serve_and_load(open_engine, queries: list[str], lang: str, setups: list[tuple[str, ServeConfig]],
                   clients: list[int], rounds: int) -> None:
    """Each setup's server in a process of its own; the same queries at each client count, in rounds;
    per cell queries/s, p95, share refused, server CPU per answer, mean batch; every answer checked
    against the same query searched in this process (the same hits, in the same order)."""
    import multiprocessing

    import torch

    engine = open_engine()
    cores = torch.get_num_threads()
    torch.set_num_threads(1)
    expected = {text: [hit.item_id for hit in engine.search([text], lang, "leccr", K)[0]]
                for text in dict.fromkeys(queries)}

    def in_process() -> list[float]:
        times = []
        for text in queries:
            began = time.perf_counter()
            engine.search([text], lang, "leccr", K)
            times.append(time.perf_counter() - began)
        return times

    with ThreadPoolExecutor(1) as worker:  # in a worker thread, as the server's workers run it
        direct = summary(worker.submit(in_process).result())
    torch.set_num_threads(cores)
    del engine
    print(f"  in-process, 1 torch thread: p50 {direct['p50_ms']:.2f} ms  p95 {direct['p95_ms']:.2f} ms  "
          f"{direct['qps']:.1f} q/s")
    print("  server in its own process(es); clients in this one; per cell: queries/s, p95 ms, share refused, "
          "the server's CPU ms per answered query, mean batch (n/a: several processes)")
    print(f"  {'':<40}" + "".join(f"{f'{c} client' + ('s' if c > 1 else ''):<37}" for c in clients))
    # Each setup's server runs in a process of its own, as `leccr serve` does: its CPU time is its
    # own, and the clients' threads take no share of its GIL. Spawned, not forked: OpenMP does not
    # survive a fork. The cells are measured in rounds, every setup in turn, so that a burst of
    # load from elsewhere on the machine falls on all setups alike.
    spawn = multiprocessing.get_context("spawn")
    servers = []
    try:
        for _, config in setups:
            port = _free_port()
            control, child_end = spawn.Pipe()
            # not a daemon: a server of several processes starts its own
            process = spawn.Process(target=_serve, args=(open_engine, config, port, child_end))
            process.start()
            servers.append((port, process, control))
        for (port, process, _), (_, config) in zip(servers, setups):
            _wait_until_up(port, process, config.process_count())
            load_test(port, process.pid, queries[:10], 1, lang)  # warm-up
        parts = {(s, c): [] for s in range(len(setups)) for c in clients}
        batches = {(s, c): [] for s in range(len(setups)) for c in clients}
        seen = [0] * len(setups)
        for round_ in range(rounds):
            share = queries[round_::rounds]
            for count in clients:
                for s, (port, process, control) in enumerate(servers):
                    parts[s, count].append(load_test(port, process.pid, share, count, lang))
                    control.send(True)
                    sizes = control.recv()
                    if sizes is not None:
                        batches[s, count] += sizes[seen[s]:]
                        seen[s] = len(sizes)
    finally:
        for _, process, control in servers:
            control.send(False)
            process.terminate()
            process.join(60)
    for s, (name, _) in enumerate(setups):
        rows = [_cell(parts[s, c], batches[s, c]) for c in clients]
        wrong = sum(hits != expected[text] for c in clients for part in parts[s, c] for text, hits in part["hits"])
        cells = "".join(f"{r['qps']:6.1f} {r['p95_ms']:7.1f} {100 * r['refused']:5.1f}% {r['cpu_ms']:5.1f} "
                        f"{r['batch']:4.1f}     " for r in rows)
        ratios = "".join(f"  {c}/{clients[0]}: x{r['qps'] / rows[0]['qps']:.2f} q/s, "
                         f"x{r['p95_ms'] / rows[0]['p95_ms']:.2f} p95"
                         for c, r in zip(clients[1:], rows[1:], strict=True))
        same = "same hits" if not wrong else f"{wrong} answers with other hits"
        print(f"  {name:<40}{cells}{ratios}  ({same})", flush=True)


def _wait_until_up(port: int, process, processes: int = 1) -> None:
    """Until the server answers, and (for up to a minute more) until each of its processes has."""
    deadline, pids, first = time.monotonic() + 300, set(), None
    while time.monotonic() < deadline:
        if not process.is_alive():
            raise RuntimeError(f"the server process ended with code {process.exitcode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/info", timeout=5) as response:
                pids.add(json.loads(response.read()).get("process"))
                first = first or time.monotonic()
                if len(pids) >= processes or time.monotonic() - first > 60:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"the server on port {port} did not answer within 300 s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000], help="none: HTTP part only")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--concepts", type=int, default=1000, help="cluster centres of the synthetic collection")
    parser.add_argument("--hnsw-max", type=int, default=100_000)
    parser.add_argument("--http-items", type=int, default=100_000)
    parser.add_argument("--http-requests", type=int, default=200, help="requests per load-test row")
    parser.add_argument("--http-clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--http-rounds", type=int, default=3, help="rounds over every setup per load-test cell")
    parser.add_argument("--http-queue-depth", type=int, default=8,
                        help="ServeConfig.queue_depth of the pooled setups (small: 16 clients overflow it)")
    parser.add_argument("--http-root", type=Path, default=None,
                        help="an artifacts root: load-test its index (one process against one per core) instead "
                             "of the synthetic one, with its items' captions as queries")
    parser.add_argument("--http-experiment", default=None, help="with --http-root: that experiment's index")
    parser.add_argument("--http-lang", default="de", help="with --http-root: the queries' language (default de)")
    args = parser.parse_args(argv)
    import torch

    print(f"CPU threads: torch {torch.get_num_threads()}")
    for n in args.sizes:
        bench_vectors(n, args.dim, args.queries, args.hnsw_max, args.concepts)
    if args.http_root is not None:
        bench_index(args.http_root, args.http_experiment, args.http_requests, args.http_clients,
                    args.http_queue_depth, args.http_rounds, args.http_lang)
    elif args.http_items:
        bench_http(args.http_items, args.dim, args.http_requests, args.http_clients, args.http_queue_depth,
                   args.http_rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
