"""Reuse at the grain of the item: a per-item stage that misses its key computes only the units
(items, captions, descriptions) whose own input changed, and takes every other unit's rows from an
earlier artifact of the same stage.

The artifact key stays the unit of truth (a hit is exact); this only shrinks the work of a miss, as
Bazel's action cache or ccache do one level down. A unit's rows can be reused when three things are
unchanged: its input digest (the fields of its work item that its output depends on: an item's media
digest, a caption's text), the stage's effective config and its code identity. The last two are the
artifact key without its upstream part, the memo salt (`KeyParts.memo_salt`): earlier artifacts with
the same salt are the sources (`Store.with_salt`). Fields that only some units depend on (a view's
prompt, a language's model) are not in the salt but in those units' input digests (`StageDef.memo_excludes`),
so adding a view or a language computes only its units. Each committed shard records its units and
their input digests in `_inputs/inputs-NNNNN.parquet`; a unit that failed there (a row of
errors.parquet) is computed again, never reused. Sources are checked as hits are and held while a
stage reads them (see `RowMemo` and `leccr.core.execute.held_sources`).

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

from leccr.core.artifact import Artifact, damaged_files, part_name, read_manifest
from leccr.core.failures import unreadable
from leccr.core.fingerprint import Fingerprinter

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
    """Where earlier rows of a unit with a given input lie: {(unit, input digest): part file}.

    A source is trusted as far as a cache hit is, never further: its manifest must read, and each
    part file and its inputs file must pass the check a hit passes (`damaged_files`: the size always,
    the content wherever the stat changed). A source whose errors file cannot be read, or whose rows
    are stored in another schema or layout than this artifact's, gives nothing. Every source skipped,
    whole or in part, is named in `skipped` (the stage logs them)."""

    def __init__(self, sources: Sequence[Artifact], subdir: str = "", schema: pa.Schema | None = None,
                 fingerprints: Fingerprinter | None = None):
        self.where: dict[tuple[str, str], Path] = {}
        self.skipped: list[str] = []
        for artifact in sources:  # newest first: the first source that has a unit wins
            reason = self._add(artifact, subdir, schema, fingerprints)
            if reason:
                self.skipped.append(f"{artifact.stage}/{artifact.key}{'/' + subdir if subdir else ''}: {reason}")

    def _add(self, artifact: Artifact, subdir: str, schema: pa.Schema | None,
             fingerprints: Fingerprinter | None) -> str | None:
        """Take the reusable units of one source; why (some of) it was skipped, or None."""
        manifest, problem = read_manifest(artifact.path)
        if manifest is None:
            return f"not used: {problem}"
        damaged = damaged_files(artifact.path, manifest, fingerprints or Fingerprinter()) if manifest.file_sizes else {}
        prefix = f"{subdir}/" if subdir else ""
        folder = artifact.path / subdir
        errors_name = f"{prefix}errors.parquet"
        if errors_name not in manifest.file_sizes or errors_name in damaged or unreadable(folder / "errors.parquet"):
            why = damaged.get(errors_name) or f"{errors_name} is missing or unreadable"
            return f"not used: its failed units cannot be told ({why})"
        parts = sorted((folder / INPUTS_DIR).glob("inputs-*.parquet"))
        if schema is not None and parts:
            stored = _stored_schema(folder, parts)
            if stored is not None and not same_layout(stored, schema):
                return f"not used: its rows are stored as {_layout(stored)}, this artifact stores {_layout(schema)}"
        failed = _failed_keys(folder / "errors.parquet")
        bad = []
        for inputs_file in parts:
            index = int(inputs_file.stem.split("-")[1])
            part = folder / part_name(index)
            names = (f"{prefix}{part_name(index)}", f"{prefix}{INPUTS_DIR}/{inputs_file.name}")
            if any(name not in manifest.file_sizes or name in damaged for name in names):
                bad.append(next((damaged[n] for n in names if n in damaged), f"shard {index} is not in its manifest"))
                continue
            table = pq.read_table(inputs_file)
            for unit, digest, error_key in zip(*(table.column(n).to_pylist() for n in INPUTS.names)):
                if error_key not in failed:
                    self.where.setdefault((unit, digest), part)
        return f"{len(bad)} shard(s) not used: {'; '.join(bad)}" if bad else None

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


def same_layout(stored: pa.Schema, wanted: pa.Schema) -> bool:
    """Whether rows stored as `stored` can be written as `wanted`: the same columns of the same types."""
    return [(f.name, f.type) for f in stored] == [(f.name, f.type) for f in wanted]


def _layout(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


def _stored_schema(folder: Path, inputs_files: list[Path]) -> pa.Schema | None:
    for inputs_file in inputs_files:
        part = folder / part_name(int(inputs_file.stem.split("-")[1]))
        if part.is_file() and unreadable(part) is None:
            return pq.read_schema(part)
    return None


def _failed_keys(errors_file: Path) -> set[str]:
    if not errors_file.is_file() or unreadable(errors_file):
        return set()
    return set(pq.read_table(errors_file, columns=["item_id"]).column("item_id").to_pylist())
