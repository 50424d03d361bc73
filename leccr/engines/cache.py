"""One loaded engine per process, reused by every shard that process computes.

A shard task on a scale-out worker (a Ray worker process) loads its model on the first shard and
keeps it for the next shards it gets: loading a 7B MLLM per shard would cost more than the shard.
Keys are the engine settings, so two configs never share an engine by accident.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_engines: dict[str, Any] = {}
_lock = threading.Lock()


def cached_engine(kind: str, settings: dict[str, Any], factory: Callable[[], T]) -> T:
    """The engine of `kind` with these settings, built by `factory()` the first time in this process."""
    key = kind + ":" + json.dumps(settings, sort_keys=True, default=str)
    with _lock:  # concurrent shard threads must not load the same model twice
        if key not in _engines:
            _engines[key] = factory()
        return _engines[key]


def clear() -> None:
    """Drop every cached engine (frees memory between unrelated runs in one process)."""
    with _lock:
        _engines.clear()


class Lazy:
    """Builds an engine on first use: a run whose shards are all committed never loads a model."""

    def __init__(self, factory: Callable[[], Any]):
        self.factory, self.value = factory, None

    def get(self) -> Any:
        if self.value is None:
            self.value = self.factory()
        return self.value
