"""Search the indexed collection with text in any trained language (`leccr search`, `leccr serve`)."""
from leccr.search.engine import DEFAULT_CANDIDATES, Hit, SearchEngine, UnknownMethod, find_index  # noqa: F401
from leccr.search.query import QueryEncoder, UnknownLanguage  # noqa: F401
