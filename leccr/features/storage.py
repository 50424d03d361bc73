"""numpy arrays <-> the Arrow array columns of the features layout (schemas/features.py), without
per-value Python objects on either side.

Writing builds each column from one contiguous numpy buffer (`FixedSizeListArray.from_arrays`,
`ListArray.from_arrays`); reading hands back numpy views over the Arrow buffers (`row_views`), which
`torch.from_numpy` wraps without a copy.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

# Row groups of about this many bytes: large enough that a sequential scan reads few, big column
# chunks (Parquet's per-group overhead vanishes), small enough that one group decodes in well under a
# second and a reader of one shard never holds more than a few of them.
ROW_GROUP_BYTES = 64 * 2**20

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


def rows_per_group(bytes_per_row: int) -> int:
    """Rows per Parquet row group so that a group holds about ROW_GROUP_BYTES."""
    return max(1, ROW_GROUP_BYTES // max(1, bytes_per_row))


def fixed_list_column(arrays: Sequence[np.ndarray], dtype: str) -> pa.FixedSizeListArray:
    """Equal-shaped arrays -> fixed_size_list<dtype>[size]; one row per array, flattened row-major."""
    if not arrays:
        raise ValueError("fixed_list_column needs at least one array (an empty shard has no shape)")
    size = arrays[0].size
    wrong = [i for i, a in enumerate(arrays) if a.size != size]
    if wrong:
        raise ValueError(f"fixed_list_column: rows {wrong[:5]} have {arrays[wrong[0]].size} values, row 0 has {size}")
    flat = np.concatenate([np.ascontiguousarray(a, dtype=NUMPY_DTYPES[dtype]).reshape(-1) for a in arrays])
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), size)


def list_column(arrays: Sequence[np.ndarray], value_type: pa.DataType, numpy_dtype) -> pa.ListArray:
    """Arrays of any sizes -> list<value_type>; one row per array, flattened row-major."""
    lengths = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
    if lengths.sum() >= 2**31:
        raise ValueError(f"list_column: {lengths.sum()} values in one shard exceed list<> int32 offsets; "
                         "lower shard_size")
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = (np.concatenate([np.ascontiguousarray(a, dtype=numpy_dtype).reshape(-1) for a in arrays])
            if arrays else np.zeros(0, dtype=numpy_dtype))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=value_type))


def float_list_column(arrays: Sequence[np.ndarray], dtype: str) -> pa.ListArray:
    return list_column(arrays, pa.float16() if dtype == "float16" else pa.float32(), NUMPY_DTYPES[dtype])


def ids_column(arrays: Sequence[Sequence[int]]) -> pa.ListArray:
    return list_column([np.asarray(a, dtype=np.int32) for a in arrays], pa.int32(), np.int32)


class RowViews:
    """Row `i` of a list / fixed-size-list column as a 1-D numpy view over the Arrow values buffer.

    Works chunk by chunk (a memory-mapped table has one chunk per record batch), so nothing is
    concatenated or copied; `fixed` columns also expose each chunk as a 2-D [rows, size] view.
    """

    def __init__(self, column: pa.ChunkedArray):
        self.fixed = pa.types.is_fixed_size_list(column.type)
        self.chunk_starts = np.zeros(column.num_chunks + 1, dtype=np.int64)
        self.values: list[np.ndarray] = []
        self.offsets: list[np.ndarray] = []
        for index, chunk in enumerate(column.chunks):
            self.chunk_starts[index + 1] = self.chunk_starts[index] + len(chunk)
            if chunk.null_count:
                raise ValueError(f"column of type {column.type} holds {chunk.null_count} null row(s)")
            if self.fixed:
                # flatten() honours the chunk's slice offset and is zero-copy.
                flat = chunk.flatten().to_numpy(zero_copy_only=True)
                self.values.append(flat.reshape(len(chunk), column.type.list_size))
            else:
                # Offsets of a sliced list array index into the unsliced values buffer.
                self.offsets.append(chunk.offsets.to_numpy(zero_copy_only=True))
                self.values.append(chunk.values.to_numpy(zero_copy_only=True))
        self.size = column.type.list_size if self.fixed else None

    def __len__(self) -> int:
        return int(self.chunk_starts[-1])

    def locate(self, row: int) -> tuple[int, int]:
        chunk = int(np.searchsorted(self.chunk_starts, row, side="right")) - 1
        return chunk, row - int(self.chunk_starts[chunk])

    def __getitem__(self, row: int) -> np.ndarray:
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for a column of {len(self)} rows")
        chunk, local = self.locate(row)
        if self.fixed:
            return self.values[chunk][local]
        offsets = self.offsets[chunk]
        return self.values[chunk][offsets[local]:offsets[local + 1]]

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """Rows of a fixed-size column as one [len(rows), size] array (one copy, by numpy fancy indexing)."""
        if not self.fixed:
            raise TypeError("gather needs a fixed-size list column")
        if len(self.values) == 1:
            return self.values[0][rows]
        out = np.empty((len(rows), self.size), dtype=self.values[0].dtype)
        chunks = np.searchsorted(self.chunk_starts, rows, side="right") - 1
        for chunk in np.unique(chunks):
            where = np.nonzero(chunks == chunk)[0]
            out[where] = self.values[chunk][rows[where] - self.chunk_starts[chunk]]
        return out
