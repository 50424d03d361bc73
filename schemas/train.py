"""The `train` stage: one folder per method, and its training history.

    train/<key>/<method>/model.safetensors, model.json, text_encoder/, train_info.json
    train/<key>/<method>/history.parquet   one row per optimiser step and per validation

history.parquet has fixed columns and one float64 column per loss term / validation metric, which
depend on the method (LECCR logs more terms than the baseline):

    method  string  baseline | leccr | cl2cm (the `history` DuckDB view unions every method)
    kind    string  "train" (a step: loss_* and lr set) | "val" (an epoch's validation: val_* set)
    step    int64   optimiser steps done (a val row: the step it followed)
    epoch   int32   1-based
    lr      float64 learning rate of the first parameter group at that step
    loss_<term>     float64  e.g. loss_total, loss_vs, loss_vt, loss_st, loss_c, loss_cv, loss_reg, loss_dstl
    val_sumr        float64  mean over the target languages of the validation SumR
    val_sumr_<lang> float64  per language

DuckDB: `SELECT method, epoch, avg(loss_total) FROM history WHERE kind = 'train' GROUP BY ALL ORDER BY ALL`.
"""
import pyarrow as pa

FIXED = [
    pa.field("method", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),
    pa.field("step", pa.int64(), nullable=False),
    pa.field("epoch", pa.int32(), nullable=False),
    pa.field("lr", pa.float64()),
]
VALUE_PREFIXES = ("loss_", "val_")


def history_schema(columns: list[str]) -> pa.Schema:
    """The schema of a history with these columns: the fixed ones, then loss_* and val_* (float64) sorted."""
    fixed = {field.name for field in FIXED}
    values = sorted(name for name in columns if name not in fixed)
    bad = [name for name in values if not name.startswith(VALUE_PREFIXES)]
    if bad:
        raise ValueError(f"history columns {bad} are neither fixed {sorted(fixed)} nor loss_*/val_*")
    return pa.schema(FIXED + [pa.field(name, pa.float64()) for name in values])


def check_history(table: pa.Table, where: str) -> pa.Table:
    """Validate a history table read back (its value columns vary by method)."""
    from leccr.schemas.core import validate

    return validate(table, history_schema(table.column_names), where)
