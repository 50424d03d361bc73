"""Search the indexed collection with text in any trained language (`leccr search`, `leccr serve`).

The names below load on first use: `leccr.search.request` (the checks every entry point shares) must
be importable without torch, so that a bad query is refused before a model library loads.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DEFAULT_CANDIDATES": "leccr.search.request",
    "BadQuery": "leccr.search.request",
    "check_request": "leccr.search.request",
    "Hit": "leccr.search.engine",
    "SearchEngine": "leccr.search.engine",
    "UnknownMethod": "leccr.search.engine",
    "find_index": "leccr.search.engine",
    "QueryEncoder": "leccr.search.query",
    "UnknownLanguage": "leccr.search.query",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'leccr.search' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
