"""Vector indexes: exact search against a naive argsort (ties to the lower row), FAISS IVF/HNSW recall
against exact, a saved index answering the same, and the index stage with FAISS."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from leccr.config import HnswConfig, IvfConfig
from leccr.engines.vectors import ExactIndex, FaissIndex, build_faiss, ivf_cells
from tests.search.conftest import method_dirs, upstream_inputs


def clustered(n: int, dim: int, seed: int, clusters: int = 50) -> np.ndarray:
    """Unit vectors around `clusters` centres: the shape real embeddings have (random ones have none)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    points = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


@pytest.mark.parametrize("k", [1, 3, 7, 50])
def test_exact_search_is_a_stable_descending_sort(k):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((7, 4)).astype(np.float32)
    vectors[5] = vectors[1]  # exact ties: the lower row comes first
    vectors[6] = vectors[1]
    queries = np.concatenate([rng.standard_normal((3, 4)).astype(np.float32), vectors[1:2]])
    scores, rows = ExactIndex(vectors).search(queries, k)
    full = queries @ vectors.T
    for query in range(len(queries)):
        expected = np.argsort(-full[query], kind="stable")[:k]
        assert rows[query].tolist() == expected.tolist()
        np.testing.assert_allclose(scores[query], full[query, expected], rtol=1e-6)
    if 3 <= k < 7:
        tied = [r for r in rows[3].tolist() if r in (1, 5, 6)]
        assert tied == [1, 5, 6][: len(tied)]


def test_ivf_cells_rule():
    assert ivf_cells(1_000_000, IvfConfig()) == min(4000, 100_000 // 39)
    assert ivf_cells(10_000, IvfConfig()) == 256  # 4 * sqrt(10k) = 400, but 10k // 39 = 256
    assert ivf_cells(10, IvfConfig()) == 1
    assert ivf_cells(100_000, IvfConfig(nlist=64)) == 64


@pytest.mark.parametrize("config", [IvfConfig(), HnswConfig()], ids=["ivf", "hnsw"])
def test_faiss_recall_against_exact_and_a_saved_index(faiss_or_skip, tmp_path, config):
    vectors = clustered(10_000, 32, seed=1)
    queries = clustered(200, 32, seed=2)
    _, truth = ExactIndex(vectors).search(queries, 10)
    index = build_faiss(vectors, config)
    scores, found = index.search(queries, 10)
    assert recall_at(found, truth) >= 0.95
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
    index.save(tmp_path)
    again = FaissIndex.load(tmp_path, config)
    assert np.array_equal(again.search(queries, 10)[1], found)
    assert len(again) == len(vectors)


def test_ivf_scanning_every_cell_is_exact(faiss_or_skip):
    vectors = clustered(2_000, 16, seed=3)
    queries = clustered(20, 16, seed=4)
    index = build_faiss(vectors, IvfConfig(nlist=8, nprobe=8))
    exact_scores, exact_rows = ExactIndex(vectors).search(queries, 5)
    scores, rows = index.search(queries, 5)
    assert np.array_equal(rows, exact_rows)
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-5)


@pytest.mark.parametrize("ann", [{"kind": "hnsw", "m": 8}, {"kind": "ivf", "nlist": 2, "nprobe": 2}])
def test_index_stage_with_faiss_searches_as_exact(faiss_or_skip, indexed, ann):
    """The stage writes vectors.faiss and its ANN setup; with every item reachable, hits equal exact search."""
    from leccr.config import parse_config
    from leccr.core.execute import run_stage
    from leccr.search import SearchEngine

    cfg, outcomes = indexed
    data = cfg.model_dump(mode="json")
    data["index"]["ann"] = ann
    outcome = run_stage(parse_config(data), "index", upstream_inputs(outcomes))
    assert outcome.artifact.key != outcomes["index"].artifact.key
    folder = outcome.artifact.path / "leccr"
    assert (folder / "vectors.faiss").is_file() and json.loads((folder / "index.json").read_text())["ann"]["kind"] == ann["kind"]
    train = method_dirs(outcomes)
    faiss_engine = SearchEngine(outcome.artifact.path, train, cfg.dataset.path, "cpu")
    exact_engine = SearchEngine(outcomes["index"].artifact.path, train, cfg.dataset.path, "cpu")
    assert faiss_engine.method("leccr").ann.kind == f"faiss-{ann['kind']}"
    query = [c["text"] for c in exact_engine.items[0]["captions"] if c["lang"] == "de"]
    for method in ("leccr", "baseline"):
        got = faiss_engine.search(query, "de", method, k=6)[0]
        want = exact_engine.search(query, "de", method, k=6)[0]
        assert [h.item_id for h in got] == [h.item_id for h in want]


def test_index_stage_without_faiss_says_how_to_get_it(indexed, monkeypatch):
    from leccr.config import parse_config
    from leccr.core.execute import run_stage
    from leccr.core.failures import StageFailed

    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError, installed or not
    cfg, outcomes = indexed
    data = cfg.model_dump(mode="json")
    data["index"]["ann"] = {"kind": "ivf"}
    with pytest.raises(StageFailed, match=r"index.ann is ivf, but faiss is not installed.*leccr\[search\]"):
        run_stage(parse_config(data), "index", upstream_inputs(outcomes))
