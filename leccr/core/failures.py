"""Failures as data (img2dataset's way): a failed item is a row of `errors.parquet` with its reason,
and a stage fails only past its error rate.

An error row says whether a rerun may succeed without a new input (`retryable`: a missing or unreadable
file, an engine error) and, for a media file, its state when it failed, so a finished artifact is
reopened only for failures whose file has changed since.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa

from leccr.core.artifact import MANIFEST
from leccr.schemas.core import read_table
from leccr.schemas.errors import ERRORS


class StageFailed(RuntimeError):
    """A stage could not finish; the message says why and what a rerun will do."""


class ItemError(NamedTuple):
    """One failed item of a shard. A plain `(item_id, reason)` tuple is a final (non-retryable) error."""

    item_id: str
    reason: str
    # True when the failure may go away without a new input: a missing or unreadable media file (a
    # mount that was down, a file being copied), an engine error. A rerun retries these items only.
    retryable: bool = False
    # The media file at fault, as items.parquet stores it (relative to the dataset root): a finished
    # artifact is reopened for a retry when this file has changed since the failure.
    file: str | None = None


def error_table(errors: list[ItemError | tuple[str, str]], stage: str, index: int,
                 dataset_root: Path | None = None) -> pa.Table:
    rows = [ItemError(*error) for error in errors]
    return pa.Table.from_pylist(
        [{"item_id": str(e.item_id), "stage": stage, "shard": index, "reason": e.reason, "file": e.file,
          "line": None, "retryable": bool(e.retryable),
          "file_state": None if e.file is None else file_state(dataset_root, e.file)} for e in rows],
        schema=ERRORS,
    )


def file_state(dataset_root: Path | None, stored: str) -> str:
    """A media file's state as an error row records it: size, mtime and inode, or "missing"."""
    from leccr.media.paths import resolve_media_path

    try:
        stat = os.stat(resolve_media_path(dataset_root, stored))
    except OSError:
        return "missing"
    return f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}"


def _due(row: dict[str, Any], dataset_root: Path | None, need_file: bool) -> bool:
    """Whether a rerun retries this error row: retryable, and its file changed since the failure (an
    error without a file, an engine error, is retried by the rerun of an unfinished stage only)."""
    if not row["retryable"]:
        return False
    if row["file"] is None:
        return not need_file
    return file_state(dataset_root, row["file"]) != row["file_state"]


def unreadable(path: Path) -> str | None:
    """Why a committed Parquet file cannot be used (empty, cut, not Parquet), or None when it is fine."""
    import pyarrow.parquet as pq

    try:
        if path.stat().st_size == 0:
            return "the file is empty (0 bytes)"
        pq.ParquetFile(path).metadata  # the footer: a cut or overwritten file fails here
    except (OSError, pa.ArrowException) as error:
        return f"{type(error).__name__}: {error}"
    return None


def retryable_ids(errors_part: Path, dataset_root: Path | None) -> set[str]:
    if not errors_part.exists():
        return set()
    table = read_table(errors_part, ERRORS, columns=["item_id", "retryable", "file", "file_state"])
    return {row["item_id"] for row in table.to_pylist() if _due(row, dataset_root, need_file=False)}


def changed_failures(folder: Path, dataset_root: Path | None) -> int:
    """Retryable failures of a finished artifact whose media file changed (fixed, restored, mounted
    again) since the failure: those a rerun tries again. A file still as it was when it failed is not
    retried, so a finished stage with a broken file stays a cache hit."""
    count = 0
    for path in sorted(folder.rglob("errors.parquet")):
        if any(part.startswith(".") for part in path.relative_to(folder).parts) or unreadable(path):
            continue
        rows = read_table(path, ERRORS, columns=["retryable", "file", "file_state"]).to_pylist()
        count += sum(_due(row, dataset_root, need_file=True) for row in rows)
    return count


def reopen_for_retry(folder: Path, dataset_root: Path | None, log: logging.Logger | logging.LoggerAdapter,
                     what: str) -> bool:
    """When files of a finished artifact's retryable failures have changed since, remove its manifest (so
    it is no longer a cache hit) and say so; the stage then runs again, keeps every committed shard and
    retries only its retryable failures. An unfinished artifact retries them anyway (see `run_shards`)."""
    if not (folder / MANIFEST).is_file():
        return False
    changed = changed_failures(folder, dataset_root)
    if not changed:
        return False
    log.info("%s: %d failed item(s) have a changed file since they failed: retrying the failed items of %s, "
             "keeping everything else", what, changed, folder)
    (folder / MANIFEST).unlink(missing_ok=True)
    return True
