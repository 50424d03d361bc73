"""pyarrow schemas for every artifact the pipeline writes.

One module per stage; `leccr.schemas.core` holds the validation every write and read goes through, so a
DuckDB user always sees the same column names and types.
"""
from leccr.schemas.core import SchemaError, read_table, validate, write_table  # noqa: F401
