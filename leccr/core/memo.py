"""Reuse at the grain of the item: a per-item stage that misses its key computes only the units
(items, captions, descriptions) whose own input changed, and takes every other unit's rows from an
earlier artifact of the same stage.

The artifact key stays the unit of truth (a hit is exact); this only shrinks the work of a miss, as
Bazel's action cache or ccache do one level down. A unit's rows can be reused when three things are
unchanged: its input digest (the fields of its work item that its output depends on: an item's media
digest, a caption's text), the stage's effective config and its code identity. The last two are the
artifact key without its upstream part, the memo salt (`KeyParts.memo_salt`): earlier artifacts with
the same salt are the sources (`Store.with_salt`). Each committed shard records its units and their
input digests in `_inputs/inputs-NNNNN.parquet`; a unit that failed there (a row of errors.parquet)
is computed again, never reused.

A reused unit's rows are the rows a full recompute writes, in the same place (shards keep rows in
the order of their work units), so the new artifact is byte-identical to a full recompute apart from
volatile columns (tests/test_memo.py builds both and compares them).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from leccr.core.artifact import Artifact, part_name
from leccr.core.failures import unreadable

INPUTS_DIR = "_inputs"
INPUTS = pa.schema([
    pa.field("unit", pa.string(), nullable=False),  # the unit's name (ShardJob.unit_columns, joined)
    pa.field("input_digest", pa.string(), nullable=False),  # digest of its input (ShardJob.input_fields)
    pa.field("error_key", pa.string(), nullable=False),  # the id its error rows would carry (ShardJob.item_id)
])
UNIT_SEPARATOR = "\x1f"


def inputs_name(index: int) -> str:
    return f"inputs-{index:05d}.parquet"


def unit_name(work_item: dict[str, Any], columns: tuple[str, ...]) -> str:
    return UNIT_SEPARATOR.join(str(work_item[column]) for column in columns)


def row_units(table: pa.Table, columns: tuple[str, ...]) -> list[str]:
    """The unit of each row of an output table (the same names `unit_name` gives work items)."""
    values = [table.column(column).to_pylist() for column in columns]
    return [UNIT_SEPARATOR.join(str(v) for v in row) for row in zip(*values)]


def input_digest(work_item: dict[str, Any], fields: tuple[str, ...]) -> str:
    payload = json.dumps({name: work_item[name] for name in fields}, sort_keys=True, ensure_ascii=False,
                         separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def in_unit_order(table: pa.Table, units: Sequence[str], columns: tuple[str, ...]) -> pa.Table:
    """The table's rows grouped by unit in the order of `units` (a unit's own rows keep their order).

    Every shard is written in this order, computed or reused, so the two give the same bytes."""
    position = {unit: i for i, unit in reversed(list(enumerate(units)))}
    names = row_units(table, columns)
    order = sorted(range(table.num_rows), key=lambda i: (position.get(names[i], len(units)), i))
    if order == list(range(table.num_rows)):
        return table
    return table.take(pa.array(order, pa.int64()))


class RowMemo:
    """Where earlier rows of a unit with a given input lie: {(unit, input digest): part file}."""

    def __init__(self, sources: Sequence[Artifact], subdir: str = ""):
        self.where: dict[tuple[str, str], Path] = {}
        for artifact in sources:  # newest first: the first source that has a unit wins
            folder = artifact.path / subdir
            failed = _failed_keys(folder / "errors.parquet")
            for inputs_file in sorted((folder / INPUTS_DIR).glob("inputs-*.parquet")):
                part = folder / part_name(int(inputs_file.stem.split("-")[1]))
                if not part.is_file() or unreadable(part) or unreadable(inputs_file):
                    continue
                table = pq.read_table(inputs_file)
                for unit, digest, error_key in zip(*(table.column(n).to_pylist() for n in INPUTS.names)):
                    if error_key not in failed:
                        self.where.setdefault((unit, digest), part)

    def __len__(self) -> int:
        return len(self.where)

    def split(self, units: Sequence[str], digests: Sequence[str]) -> dict[int, Path]:
        """{position in `units`: the part file holding its rows} for the units that can be reused."""
        found = {}
        for i, (unit, digest) in enumerate(zip(units, digests)):
            part = self.where.get((unit, digest))
            if part is not None:
                found[i] = part
        return found

    @staticmethod
    def rows(reused: dict[int, Path], units: Sequence[str], columns: tuple[str, ...], schema: pa.Schema) -> pa.Table:
        """The earlier rows of the reused units, read from their part files."""
        from leccr.schemas.core import read_table

        by_part: dict[Path, list[str]] = {}
        for position, part in reused.items():
            by_part.setdefault(part, []).append(units[position])
        tables = []
        for part, wanted in sorted(by_part.items()):
            table = read_table(part, schema)
            keep = pc.is_in(pa.array(row_units(table, columns), pa.string()), pa.array(wanted, pa.string()))
            tables.append(table.filter(keep))
        return pa.concat_tables(tables) if tables else schema.empty_table()


def _failed_keys(errors_file: Path) -> set[str]:
    if not errors_file.is_file() or unreadable(errors_file):
        return set()
    return set(pq.read_table(errors_file, columns=["item_id"]).column("item_id").to_pylist())
