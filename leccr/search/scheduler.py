"""How `leccr serve` runs searches: a bounded queue, a fixed pool of search threads, batches.

    queue = SearchQueue(engine, ServeConfig(workers=1, max_batch=16, queue_depth=64))
    hits = queue.submit("ein Hund", "de", "leccr", 10, 200).result()   # raises Overloaded when full

Why not one thread per request (FastAPI's thread pool, as before): each request's torch ran its own
OpenMP team of `torch.get_num_threads()` threads, whose per-operator barriers wait for partners that
are not running when the teams outnumber the cores: at 16 clients on 2 cores the server spent twice the
CPU per query and p95 reached seconds (docs/search.md, "Many clients at once"; benchmarks/bench_search.py).
Here at most `workers` searches run at once, each on `torch_threads` threads (set once per process by
`leccr serve`), and the rest wait in a queue of `queue_depth`; past that a request is refused at once
(Overloaded: the server's 503 + Retry-After) instead of waiting without bound.

Batching: a worker that becomes free takes the oldest waiting request and, with it, up to
`max_batch - 1` more that wait for the same (method, language, k, candidates), and answers them with
one `SearchEngine.search` call: one encoder forward, one matrix product over the collection. Nothing
waits for a batch to fill; batches form only when requests queue up, so one client's latency is
unchanged. A batch shares the search's Python work (which holds the GIL) among its queries. Every
query gets the hits of the same query alone, in the same order, and the same scores to float32
rounding (~1e-6: the encoder masks the padding, but a padded many-row product rounds differently
from a one-row one; tests/search/test_scheduler.py).
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from leccr.config import ServeConfig
from leccr.search.engine import Hit, SearchEngine


class Overloaded(RuntimeError):
    """The queue already holds `queue_depth` waiting requests; ask again after `retry_after_s`."""

    def __init__(self, waiting: int, retry_after_s: int):
        super().__init__(f"the server is busy: {waiting} searches are already waiting; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass
class _Request:
    batch_key: tuple[str, str, int, int]  # (method, lang, k, candidates): requests one call can answer together
    text: str
    future: Future = field(default_factory=Future)


class SearchQueue:
    """`submit(...) -> Future[list[Hit]]`, run on `config.workers` threads, at most `config.queue_depth` waiting."""

    def __init__(self, engine: SearchEngine, config: ServeConfig):
        self.engine, self.config = engine, config
        self._waiting: deque[_Request] = deque()
        self._changed = threading.Condition()
        self._closed = False
        self.batch_sizes: list[int] = []  # size of every batch run so far (for tests and benchmarks)
        self._threads = [
            threading.Thread(target=self._work, name=f"search-{i}", daemon=True) for i in range(config.workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, text: str, lang: str, method: str, k: int, candidates: int) -> Future:
        request = _Request((method, lang, k, candidates), text)
        with self._changed:
            if self._closed:
                raise RuntimeError("the search queue is closed")
            if len(self._waiting) >= self.config.queue_depth:
                raise Overloaded(len(self._waiting), self.config.retry_after_s)
            self._waiting.append(request)
            self._changed.notify()
        return request.future

    def close(self) -> None:
        """Stop the workers once the requests already queued are answered."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        for thread in self._threads:
            thread.join()

    def _next_batch(self) -> list[_Request] | None:
        with self._changed:
            while not self._waiting and not self._closed:
                self._changed.wait()
            if not self._waiting:
                return None
            first = self._waiting.popleft()
            batch = [first]
            for request in list(self._waiting):
                if len(batch) == self.config.max_batch:
                    break
                if request.batch_key == first.batch_key:
                    self._waiting.remove(request)
                    batch.append(request)
            return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = [request for request in batch if request.future.set_running_or_notify_cancel()]
            if not live:
                continue
            self.batch_sizes.append(len(live))
            method, lang, k, candidates = live[0].batch_key
            try:
                answers: list[list[Hit]] = self.engine.search([r.text for r in live], lang, method, k, candidates)
            except Exception as error:  # noqa: BLE001 - handed to each caller, who raises it in the handler
                for request in live:
                    request.future.set_exception(error)
                continue
            for request, hits in zip(live, answers, strict=True):
                request.future.set_result(hits)
