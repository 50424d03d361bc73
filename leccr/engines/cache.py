"""One loaded engine per process, reused by every shard that process computes.

A shard task on a scale-out worker (a Ray worker process) loads its model on the first shard and
keeps it for the next shards it gets: loading a 7B MLLM per shard would cost more than the shard.
Keys are the engine settings, with each model folder named in `paths` by its content identity
(`leccr.core.fingerprint.stat_identity`), so two configs never share an engine by accident and a
model rewritten in place under the same path is loaded again.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_engines: dict[str, Any] = {}
_lock = threading.Lock()


def cached_engine(
    kind: str, settings: dict[str, Any], factory: Callable[[], T], paths: tuple[str, ...] = ("path",)
) -> T:
    """The engine of `kind` with these settings, built by `factory()` the first time in this process.

    `paths`: the settings that name model files or folders; they count by content, not by name."""
    from leccr.core.fingerprint import stat_identity

    identity = {name: stat_identity(settings[name]) for name in paths if settings.get(name)}
    key = kind + ":" + json.dumps({**settings, "content": identity}, sort_keys=True, default=str)
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
