"""Schema validation for Parquet artifacts: every write and every read of an artifact goes through here."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from leccr.core.io import durable_replace, temporary_name

# Bumped when any artifact schema changes incompatibly; recorded in every manifest.
SCHEMA_VERSION = 3  # 2: errors gained file, line, retryable; 3: model_digest in describe and translate rows


# Field metadata of a column that records how a row was made, not what it holds (a timing, a file's
# inode): left out of the artifact's content digest, so it never changes a downstream key.
VOLATILE = {"leccr.volatile": "true"}


def volatile_columns(schema: pa.Schema) -> list[str]:
    return [f.name for f in schema if f.metadata and f.metadata.get(b"leccr.volatile") == b"true"]


class SchemaError(ValueError):
    """A table does not match the schema of the artifact it claims to be."""


def validate(table: pa.Table, schema: pa.Schema, where: str) -> pa.Table:
    """Check `table` against `schema` and return it with the schema's column order.

    Column names and types must match exactly (no silent casts: a float64 column where float32 is
    expected is an error, because it would change what DuckDB users see); non-nullable columns must
    hold no nulls. `where` names the file or shard in the error message.
    """
    got = {f.name: f.type for f in table.schema}
    missing = [f.name for f in schema if f.name not in got]
    extra = [name for name in got if schema.get_field_index(name) < 0]
    problems = []
    if missing:
        problems.append(f"missing column(s) {missing}")
    if extra:
        problems.append(f"unexpected column(s) {extra}")
    for field in schema:
        if field.name in got and got[field.name] != field.type:
            problems.append(f"column {field.name!r} has type {got[field.name]}, expected {field.type}")
    if not problems:
        for field in schema:
            if not field.nullable and table.column(field.name).null_count:
                problems.append(
                    f"column {field.name!r} has {table.column(field.name).null_count} null(s) "
                    "but is not nullable"
                )
    if problems:
        raise SchemaError(f"{where}: " + "; ".join(problems))
    return table.select(schema.names).cast(schema)


def float_array_columns(schema: pa.Schema) -> list[str]:
    """Columns holding arrays of floats (features, encoder states): list or fixed-size list of float."""
    return [f.name for f in schema
            if (pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type)) and pa.types.is_floating(f.type.value_type)]


def write_options(schema: pa.Schema) -> dict:
    """pq.write_table options: pyarrow's defaults, except for float array columns, written plain —
    no dictionary (pyarrow tries one, then falls back, for every page), no min/max statistics (no
    reader filters on an embedding value) and no compression (model outputs barely compress).
    Measured by benchmarks/bench_features.py (write-options): 12.4x numpy.save with the defaults,
    8.6x plain, 10.2x zstd, 13.4x byte-stream-split + zstd, every file within 1.3 % of the .npy size."""
    floats = float_array_columns(schema)
    if not floats:
        return {}
    others = [name for name in schema.names if name not in floats]
    return {"use_dictionary": others, "write_statistics": others,
            "compression": {name: "none" if name in floats else "snappy" for name in schema.names}}


def write_table(table: pa.Table, path: Path, schema: pa.Schema, row_group_size: int | None = None) -> Path:
    """Validate and write `table` to `path` atomically (temp file in the same folder, then rename).

    A reader never sees a half-written file: either the old content, nothing, or the new file. The
    file is fsynced before the rename and the folder after it, so a power cut cannot leave a committed
    name over an empty or partial file.
    """
    table = validate(table, schema, str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    pq.write_table(table, tmp, row_group_size=row_group_size, **write_options(schema))
    durable_replace(tmp, path)
    return path


def read_table(path: Path | list[Path], schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    """Read one Parquet file (or several, concatenated) and validate it against `schema`."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths:
        table = schema.empty_table()
    else:
        tables = [validate(pq.read_table(p), schema, str(p)) for p in paths]
        table = pa.concat_tables(tables)
    return table.select(columns) if columns else table
