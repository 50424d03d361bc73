"""A stage's work list kept in Arrow: rows become Python dicts a block at a time, when read.

A per-item stage's work is a sequence of dict-like rows (leccr.core.shards.ShardJob.work). Built as a
list of dicts, a benchmark's work costs ~0.5 KB per row in Python objects: at Multi30K's size the
features stage's 608k captions held 334 MB, and translate's 465k (caption, language) units more, for the
whole run of the stage. `TableRows` keeps the rows in an Arrow table and hands out `RowRef`s (two
words each); reading a field converts that row's block of `BLOCK` rows to dicts and keeps the last two
blocks, so a shard read in order converts each block once and memory stays at a few blocks.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa

BLOCK = 4096  # rows converted at once
KEPT_BLOCKS = 2  # converted blocks kept (a shard that straddles two blocks reads both)


class TableRows(Sequence):
    """The rows of `table` as read-only mappings. `finish(row)` adds derived fields to each converted
    row dict (shared values such as a language's model identity, kept once instead of per row)."""

    def __init__(self, table: pa.Table, finish: Callable[[dict], dict] | None = None):
        self.table = table.combine_chunks()
        self.finish = finish
        self._blocks: OrderedDict[int, list[dict]] = OrderedDict()
        self._lock = threading.Lock()  # a shard's rows are also read by the background writer thread

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [RowRef(self, i) for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} out of range ({len(self)} rows)")
        return RowRef(self, index % len(self))

    def __iter__(self) -> Iterator[RowRef]:
        return (RowRef(self, i) for i in range(len(self)))

    def row(self, index: int) -> dict:
        """Row `index` as a dict (shared by every RowRef of that row while its block is kept)."""
        number, offset = divmod(index, BLOCK)
        with self._lock:
            block = self._blocks.get(number)
            if block is None:
                block = self.table.slice(number * BLOCK, BLOCK).to_pylist()
                if self.finish is not None:
                    block = [self.finish(row) for row in block]
                self._blocks[number] = block
                while len(self._blocks) > KEPT_BLOCKS:
                    self._blocks.popitem(last=False)
            else:
                self._blocks.move_to_end(number)
        return block[offset]


class RowRef(Mapping):
    """One row of a TableRows: reads go to the row's dict, converted on demand."""

    __slots__ = ("rows", "index")

    def __init__(self, rows: TableRows, index: int):
        self.rows, self.index = rows, index

    def __getitem__(self, key: str) -> Any:
        return self.rows.row(self.index)[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.rows.row(self.index))

    def __len__(self) -> int:
        return len(self.rows.row(self.index))

    def __repr__(self) -> str:
        return f"RowRef({self.index}, {self.rows.row(self.index)!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return dict(self.items()) == dict(other.items())
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]
