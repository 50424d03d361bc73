"""Vector indexes over normalised embeddings (inner product = cosine): exact, or FAISS IVF / HNSW.

Every index answers `search(queries [Q, E] float32, k) -> (scores [Q, k], rows [Q, k])`, best first;
a row of -1 (score -inf) pads a query that found fewer than k items (an IVF probe of sparse cells).

Exact search is the reference and the default: one matrix product over every item, ties broken
towards the lower row (as evaluate's stable sort). FAISS is optional (`pip install faiss-cpu`, the
`search` extra): `faiss_missing()` says why it cannot be used.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from leccr.config import HnswConfig, IvfConfig

FAISS_FILE = "vectors.faiss"
QUERY_CHUNK = 256  # queries per matrix product in exact search (bounds the [Q, N] score block)


def faiss_missing() -> str | None:
    """None when FAISS can be imported, else the reason (for errors and skipped tests)."""
    try:
        import faiss  # noqa: F401
    except ImportError as error:
        return f"faiss is not installed ({error}); install the search extra: pip install 'leccr[search]'"
    return None


def _top_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """Rows of the k best scores, best first; among equal scores the lower row first (a stable sort)."""
    if k >= len(scores):
        return np.argsort(-scores, kind="stable")
    threshold = scores[np.argpartition(-scores, k - 1)[k - 1]]
    above = np.flatnonzero(scores > threshold)
    tied = np.flatnonzero(scores == threshold)[: k - len(above)]
    chosen = np.concatenate([above, tied])
    return chosen[np.lexsort((chosen, -scores[chosen]))]


class ExactIndex:
    """Inner product against every row of a float32 matrix [N, E]."""

    kind = "exact"

    def __init__(self, vectors: np.ndarray):
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, len(self.vectors))
        scores = np.empty((len(queries), k), dtype=np.float32)
        rows = np.empty((len(queries), k), dtype=np.int64)
        for start in range(0, len(queries), QUERY_CHUNK):
            block = queries[start:start + QUERY_CHUNK] @ self.vectors.T
            for offset, row_scores in enumerate(block):
                top = _top_rows(row_scores, k)
                rows[start + offset], scores[start + offset] = top, row_scores[top]
        return scores, rows


class FaissIndex:
    """A FAISS index (IndexIVFFlat or IndexHNSWFlat, inner product) with its query-time setting applied."""

    def __init__(self, index, config: IvfConfig | HnswConfig):
        self.index, self.config = index, config
        self.kind = f"faiss-{config.kind}"
        if isinstance(config, IvfConfig):
            index.nprobe = config.nprobe
        else:
            index.hnsw.efSearch = config.ef_search

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(self)))
        return scores, rows.astype(np.int64)

    def save(self, folder: Path) -> Path:
        import faiss

        from leccr.core.io import atomic_write_bytes

        return atomic_write_bytes(folder / FAISS_FILE, faiss.serialize_index(self.index).tobytes())

    @classmethod
    def load(cls, folder: Path, config: IvfConfig | HnswConfig) -> FaissIndex:
        import faiss

        data = np.fromfile(folder / FAISS_FILE, dtype=np.uint8)
        return cls(faiss.deserialize_index(data), config)


def ivf_cells(n_items: int, config: IvfConfig) -> int:
    """The configured nlist, else 4*sqrt(N); never more than the training sample gives 39 points each
    (FAISS's k-means warns below that) and never less than 1."""
    train = min(n_items, config.train_size)
    wanted = config.nlist if config.nlist is not None else int(4 * math.sqrt(n_items))
    return max(1, min(wanted, train // 39))


def build_faiss(vectors: np.ndarray, config: IvfConfig | HnswConfig) -> FaissIndex:
    """Train (IVF: k-means on a seeded sample) and fill a FAISS index with every row of `vectors`."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n_items, dim = vectors.shape
    if isinstance(config, IvfConfig):
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, ivf_cells(n_items, config), faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = config.seed
        rng = np.random.default_rng(config.seed)
        sample = vectors if n_items <= config.train_size else vectors[
            np.sort(rng.choice(n_items, config.train_size, replace=False))]
        index.train(sample)
    else:
        index = faiss.IndexHNSWFlat(dim, config.m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.ef_construction
    index.add(vectors)
    return FaissIndex(index, config)
