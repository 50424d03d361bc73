"""Where an item's media file is now: items.parquet stores paths relative to the dataset root.

Its own module, apart from the dataset adapters, so that the stages and the store that open media
carry no dataset layout in their code identity."""
from __future__ import annotations

from pathlib import Path


def resolve_media_path(root: str | Path | None, stored: str | None) -> str | None:
    """An item's `path` / `feature_path` as stored in items.parquet (relative to the dataset root, or
    absolute where the file lies outside it) resolved against the configured dataset root."""
    if stored is None:
        return None
    if root is None or Path(stored).is_absolute():
        return stored
    return str(Path(root).absolute() / stored)
