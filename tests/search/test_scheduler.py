"""How `leccr serve` runs searches (SearchQueue): answers from batches equal each query's answer alone,
under concurrent clients; a full queue is a 503 with Retry-After; the settings are checked.

The engine's model lock (held by `SearchEngine.method` for every search) is held by the test to keep
the one worker busy while requests pile up: that makes batches and a full queue certain, not timing luck.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from leccr.config import ServeConfig
from leccr.search import SearchEngine
from leccr.search.server import create_app
from tests.search.conftest import method_dirs


@pytest.fixture
def engine(indexed) -> SearchEngine:
    cfg, outcomes = indexed
    return SearchEngine(outcomes["index"].artifact.path, method_dirs(outcomes), cfg.dataset.path, "cpu")


def _until(condition, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


def _queries(engine: SearchEngine) -> list[tuple[str, str, str]]:
    """(text, lang, method): every item's German and English caption with leccr, the German with baseline."""
    queries = []
    for item in engine.items:
        text = {c["lang"]: c["text"] for c in item["captions"]}
        queries += [(text["de"], "de", "leccr"), (text["en"], "en", "leccr"), (text["de"], "de", "baseline")]
    return queries


def test_concurrent_clients_get_from_batches_what_each_query_gets_alone(engine):
    serving = ServeConfig(workers=1, max_batch=8, queue_depth=64)
    app = create_app(engine, serving=serving)
    queue = app.state.search_queue
    queries = _queries(engine) * 2
    clients = 8

    def ask(query):
        text, lang, method = query
        response = client.get("/api/search", params={"q": text, "lang": lang, "method": method, "k": 4})
        assert response.status_code == 200, response.text
        return response.json()["hits"]

    with TestClient(app) as client, ThreadPoolExecutor(clients) as pool:
        with engine._lock:  # the worker takes one request and waits here; the other clients' queue up
            answers = pool.map(ask, queries)
            # the worker took a first batch (one request, or several of one kind that arrived together)
            # and waits for the lock: every other client's request then waits in the queue
            _until(
                lambda: len(queue._waiting) + sum(queue.batch_sizes) == clients, "every other client's request waits"
            )
        answers = list(answers)
    assert max(queue.batch_sizes) > 1  # 7 waiting over 3 (method, lang) kinds: some answered together
    assert sum(queue.batch_sizes) == len(queries)
    for (text, lang, method), hits in zip(queries, answers, strict=True):
        alone = engine.search([text], lang, method, 4)[0]
        assert [h["item_id"] for h in hits] == [h.item_id for h in alone]
        # float32 rounding: a batch's padded, many-row products round differently in the 7th digit
        assert [h["score"] for h in hits] == pytest.approx([h.score for h in alone], rel=1e-5, abs=1e-6)
        assert [h["global_score"] for h in hits] == pytest.approx([h.global_score for h in alone], rel=1e-5, abs=1e-6)


def test_a_full_queue_answers_503_with_retry_after(engine):
    serving = ServeConfig(workers=1, queue_depth=2, retry_after_s=3)
    app = create_app(engine, serving=serving)
    queue = app.state.search_queue
    text = _queries(engine)[0][0]

    def ask():
        return client.get("/api/search", params={"q": text, "lang": "de", "k": 3})

    with TestClient(app) as client, ThreadPoolExecutor(3) as pool:
        with engine._lock:
            running = pool.submit(ask)
            _until(lambda: queue.batch_sizes == [1], "the worker took the first request")
            queued = [pool.submit(ask) for _ in range(2)]
            _until(lambda: len(queue._waiting) == 2, "two requests wait")
            refused = ask()
        answered = [future.result() for future in (running, *queued)]
    assert refused.status_code == 503
    assert refused.headers["Retry-After"] == "3"
    assert "2 searches are already waiting" in refused.json()["detail"]
    assert [r.status_code for r in answered] == [200, 200, 200]
    with pytest.raises(RuntimeError, match="closed"):  # the app's shutdown stopped the workers
        queue.submit(text, "de", "leccr", 3, 10)


@pytest.mark.parametrize(
    "field, value", [("workers", 0), ("torch_threads", 0), ("max_batch", 0), ("queue_depth", 0), ("retry_after_s", 0)]
)
def test_serve_settings_are_checked(field, value):
    with pytest.raises(ValidationError, match=field):
        ServeConfig(**{field: value})


def test_leccr_serve_rejects_a_bad_setting_before_loading_anything(tmp_path, capsys):
    from leccr.cli import main

    assert main(["serve", "--queue-depth", "0", "--root", str(tmp_path / "no-store")]) == 2
    assert "--queue-depth 0: Input should be greater than or equal to 1" in capsys.readouterr().err
