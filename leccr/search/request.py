"""What a search request may ask, checked the same way for `leccr search`, `/api/search` and the page.

No torch, no model: a bad query is refused before anything loads (the CLI answers it in well under a
second). Each refusal is a `BadQuery` whose text is the API's `detail` and the CLI's error line, and
whose `status` is the HTTP status the API answers with (the CLI exits 2 for every one).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_CANDIDATES = 200  # items re-scored by the method's inference score per query
DEFAULT_K = 10
MAX_QUERY_CHARS = 500  # a caption-length query; longer text is truncated by the tokenizer anyway
MAX_K = 100  # hits per answer
MAX_CANDIDATES = 10_000  # re-scored items per query: bounds the work of one request


class BadQuery(ValueError):
    """A query, k or candidates the search refuses; `status` is the HTTP status for it."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class SearchRequest:
    text: str  # stripped
    k: int
    candidates: int


def check_request(
    text: str, k: int = DEFAULT_K, candidates: int = DEFAULT_CANDIDATES, max_query_chars: int = MAX_QUERY_CHARS
) -> SearchRequest:
    """The request with its text stripped, or BadQuery naming the first thing wrong with it."""
    stripped = text.strip()
    if not stripped:
        raise BadQuery("the query is empty")
    if "\x00" in stripped:
        raise BadQuery("the query holds a NUL character")
    if len(stripped) > max_query_chars:
        raise BadQuery(f"the query is {len(stripped)} characters long; the limit is {max_query_chars}", 413)
    if not 1 <= k <= MAX_K:
        raise BadQuery(f"k must be between 1 and {MAX_K}, got {k}")
    if not 1 <= candidates <= MAX_CANDIDATES:
        raise BadQuery(f"candidates must be between 1 and {MAX_CANDIDATES}, got {candidates}")
    return SearchRequest(stripped, k, candidates)


class UnknownMethod(ValueError):
    """A method that the index artifact does not hold (the API answers 404)."""


class UnknownLanguage(ValueError):
    """A query language the method was not trained on (the API answers 400)."""
