"""leccr.core.rows: a work list kept in Arrow reads as the list of dicts it stands for, a block at a time."""

import threading

import pyarrow as pa

from leccr.core import rows as rows_module
from leccr.core.rows import TableRows


def test_rows_read_as_the_table_s_dicts_and_convert_a_few_blocks_only(monkeypatch):
    monkeypatch.setattr(rows_module, "BLOCK", 4)
    table = pa.table({"id": [f"i{n}" for n in range(10)], "n": list(range(10))})
    rows = TableRows(table, finish=lambda row: {**row, "double": row["n"] * 2})
    assert len(rows) == 10 and [dict(r) for r in rows] == [{"id": f"i{n}", "n": n, "double": 2 * n} for n in range(10)]
    assert len(rows._blocks) == 2  # blocks 1 and 2 kept, block 0 dropped
    shard = rows[3:7]
    assert [r["n"] for r in shard] == [3, 4, 5, 6] and rows[-1]["id"] == "i9"
    assert rows[2] == {"id": "i2", "n": 2, "double": 4} and {**rows[2], "extra": 1}["extra"] == 1


def test_rows_read_from_two_threads_agree():
    table = pa.table({"n": list(range(20_000))})
    rows = TableRows(table)
    seen = [[], []]

    def read(out):
        out.extend(r["n"] for r in rows)

    threads = [threading.Thread(target=read, args=(seen[i],)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen[0] == seen[1] == list(range(20_000))
