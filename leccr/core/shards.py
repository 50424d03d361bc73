"""Shards: long stages process their work in shards, each committed as `part-NNNNN.parquet`.

A shard is written through a temporary name, an fsync and a rename, so a crash loses at most the
shard in progress and a rerun keeps every committed one. A worker claims a shard before computing it
(leccr.core.claims), so two runs on one root never compute a shard twice, and commits it only while the
claim is still its own. Failed items become rows of `_errors/part-NNNNN.parquet` (merged into
`errors.parquet` at the end); a rerun retries the retryable ones. With a row memo (leccr.core.memo), a
shard computes only its units whose input changed.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from leccr.core.artifact import part_name
from leccr.core.claims import Claims, shard_claim
from leccr.core.failures import ItemError, StageFailed, error_table, retryable_ids, unreadable
from leccr.core.memo import INPUTS, INPUTS_DIR, RowMemo, in_unit_order, input_digest, inputs_name, row_units, unit_name
from leccr.runtime.progress import progress
from leccr.schemas.core import read_table, validate, write_table
from leccr.schemas.errors import ERRORS

if TYPE_CHECKING:
    from leccr.core.context import StageContext

T = TypeVar("T")


@dataclass
class ShardResult:
    """What one shard's processing produced: the rows to commit and the items that failed."""

    table: pa.Table
    errors: list[ItemError | tuple[str, str]] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)  # summed into the stage summary (e.g. tokens)


@dataclass
class ShardTotals:
    items: int = 0
    rows: int = 0  # committed output rows (error rows are not output)
    errors: int = 0
    retryable_errors: int = 0  # of `errors`: the ones a rerun retries
    shards_done: int = 0
    shards_resumed: int = 0  # committed by an earlier (or concurrent) run and kept as they were
    shards_recomputed: int = 0  # of `shards_done`: committed but empty or unreadable, computed again
    items_retried: int = 0  # failed items of committed shards computed again
    units_computed: int = 0  # work units of the shards this call committed that were computed
    units_reused: int = 0  # ... and those whose rows came from an earlier artifact (row memo)
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class ShardJob(Generic[T]):
    """One sharded table of a stage: its work, how to process a shard, and where it goes.

    Work items are dicts. `unit_columns` name a unit of work, in the work items and in the output
    rows alike (a shard's rows are kept grouped by unit, in work order); `input_fields` are the fields
    of a work item that its output depends on: with them, a unit whose input is unchanged since an
    earlier artifact of the same code and config is reused, not computed (None: always computed).
    """

    work: Sequence[T]
    shard_size: int  # work items per shard, or groups of them with `group_of`
    schema: pa.Schema  # what its shards hold; the row memo reuses only rows stored the same way
    item_id: Callable[[T], str]  # the id an error row of this work item carries
    # (work items of one shard, its index) -> its rows; None in a job built only to be counted (dry run)
    process: Callable[[list[T], int], ShardResult] | None = None
    unit_columns: tuple[str, ...] = ("item_id",)
    # A work item's unit name when work items are not dicts (default: its `unit_columns`, joined)
    unit_of: Callable[[T], str] | None = None
    input_fields: tuple[str, ...] | None = None
    group_of: Callable[[T], str] | None = None
    subdir: str = ""
    max_error_rate: float | None = None
    unit: str = "items"
    error_unit: str | None = None
    # What the error rate is a share of, when not the work items: describe's error rows are per item,
    # its work units per item and view.
    error_base: int | None = None
    row_group_size: int | None = None
    background_write: bool = False
    schema_final: bool = True  # False: `schema` is a guess (a dry run's job before a model fixes the layout)

    def units(self, shard: Sequence[T]) -> list[str]:
        if self.unit_of is not None:
            return [self.unit_of(w) for w in shard]
        return [unit_name(w, self.unit_columns) for w in shard]  # type: ignore[arg-type]

    def digests(self, shard: Sequence[T]) -> list[str]:
        assert self.input_fields is not None
        return [input_digest(w, self.input_fields) for w in shard]  # type: ignore[arg-type]


def shard_plan(work: Sequence[T], shard_size: int, group_of: Callable[[T], str] | None = None) -> list[list[T]]:
    """Split `work` (already in a stable order) into consecutive shards of `shard_size` items, or of
    `shard_size` groups of consecutive items with the same `group_of`."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if group_of is None:
        return [list(work[i : i + shard_size]) for i in range(0, len(work), shard_size)]
    shards: list[list[T]] = []
    groups, previous = 0, object()
    for unit in work:
        group = group_of(unit)
        if group != previous:
            if groups % shard_size == 0:
                shards.append([])
            groups += 1
            previous = group
        shards[-1].append(unit)
    return shards


@dataclass
class MemoSplit:
    """For each shard, which of its units are reused (position -> earlier part file) and which computed."""

    reused: list[dict[int, Path]]
    shards: list[list[Any]]

    def to_compute(self, index: int) -> list[Any]:
        return [w for i, w in enumerate(self.shards[index]) if i not in self.reused[index]]

    @property
    def computed_units(self) -> int:
        return sum(len(shard) - len(reused) for shard, reused in zip(self.shards, self.reused))

    @property
    def reused_units(self) -> int:
        return sum(len(reused) for reused in self.reused)


def memo_split(job: ShardJob, memo: RowMemo | None) -> MemoSplit:
    shards = shard_plan(job.work, job.shard_size, job.group_of)
    if memo is None or job.input_fields is None or not len(memo):
        return MemoSplit([{} for _ in shards], shards)
    return MemoSplit([memo.split(job.units(shard), job.digests(shard)) for shard in shards], shards)


class ShardWriter:
    """Runs shard commits on one background thread, so that writing shard N (Parquet encoding,
    which releases the GIL) overlaps computing shard N+1.

    At most `depth` commits are queued or running: `submit` first waits for the oldest beyond that
    (which bounds the shard tables held in memory) and re-raises its error in the caller's thread;
    `close` waits for the rest, so every submitted shard is committed (or its error raised) before
    the caller reads the folder.
    """

    def __init__(self, depth: int = 1):
        self.depth = depth
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._pending: deque[Future] = deque()

    def submit(self, commit: Callable[[], None]) -> None:
        while len(self._pending) >= self.depth:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(commit))

    def close(self) -> None:
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True)


@contextlib.contextmanager
def _closing(writer: ShardWriter | None) -> Iterator[None]:
    """Wait for the writer's commits on the way out, also when processing raised (a shard already
    handed to the writer is still committed, as it would have been without one)."""
    try:
        yield
    finally:
        if writer is not None:
            writer.close()


def _num_rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def _add_stats(totals: ShardTotals, result: ShardResult) -> None:
    for name, value in result.stats.items():
        totals.stats[name] = totals.stats.get(name, 0.0) + value


class ShardRun:
    """One call of `run_shards`: the claims, counts and progress of one stage table's shards."""

    def __init__(self, ctx: StageContext, job: ShardJob, split: MemoSplit):
        self.ctx, self.job, self.split = ctx, job, split
        self.folder = ctx.out_dir / job.subdir
        self.label = f"{ctx.stage}{'/' + job.subdir if job.subdir else ''}"
        self.claims = Claims(self.folder)
        self.totals = ShardTotals(items=len(job.work))
        self.writer = ShardWriter() if job.background_write else None
        self.log: logging.Logger | logging.LoggerAdapter = ctx.log
        self.bar: Any = None

    # ----------------------------------------------------------------------------- one shard
    def commit(self, index: int, table: pa.Table, errors: list, shard: list) -> None:
        """Inputs and error rows first, then the part file: a part file on disk means a complete shard."""
        job = self.job
        units = job.units(shard)
        table = in_unit_order(table, units, job.unit_columns)
        errors_table = error_table(errors, self.ctx.stage, index, self.ctx.dataset_root)
        self.fence(index)
        if job.input_fields is not None:
            inputs = pa.table({"unit": pa.array(units, pa.string()),
                               "input_digest": pa.array(job.digests(shard), pa.string()),
                               "error_key": pa.array([job.item_id(w) for w in shard], pa.string())})
            write_table(inputs, self.folder / INPUTS_DIR / inputs_name(index), INPUTS)
        write_table(errors_table, self.folder / "_errors" / part_name(index), ERRORS)
        write_table(table, self.folder / part_name(index), job.schema, job.row_group_size)

    def fence(self, index: int) -> None:
        """Just before a shard's files are written: raise ClaimLost if another worker holds it now."""
        self.claims.check(shard_claim(index), f"Shard {index} of {self.label} is not committed by this worker; "
                                              "the worker holding it now commits it, and committed shards are kept.")

    def compute(self, index: int) -> Callable[[], None]:
        """Process shard `index` (its units that cannot be reused) and return its commit."""
        shard = self.split.shards[index]
        reused = self.split.reused[index]
        todo = self.split.to_compute(index)
        result = self.job.process(todo, index) if todo else ShardResult(self.job.schema.empty_table())
        table = validate(result.table, self.job.schema, str(self.folder / part_name(index)))
        if reused:
            table = pa.concat_tables([table, RowMemo.rows(reused, self.job.units(shard), self.job.unit_columns,
                                                          self.job.schema)])
        _add_stats(self.totals, result)
        self.totals.units_computed += len(todo)
        self.totals.units_reused += len(reused)
        return partial(self.commit, index, table, list(result.errors), shard)

    def retry(self, index: int, subset: list) -> None:
        """Compute a committed shard's retryable failures again; keep its other rows and errors.

        The part file is rewritten first (old rows of the retried items dropped, so a crash between the
        two writes and another retry cannot duplicate rows), then the errors file.
        """
        job, shard = self.job, self.split.shards[index]
        part, errors_part = self.folder / part_name(index), self.folder / "_errors" / part_name(index)
        retried_units = pa.array(job.units(subset), pa.string())
        retried_keys = pa.array(sorted({job.item_id(w) for w in subset}), pa.string())
        result = job.process(subset, index)
        table = validate(result.table, job.schema, f"retry of shard {index}")
        new_rows = table.filter(pc.is_in(pa.array(row_units(table, job.unit_columns), pa.string()), retried_units))
        new_errors = error_table(result.errors, self.ctx.stage, index, self.ctx.dataset_root)
        new_errors = new_errors.filter(pc.is_in(new_errors.column("item_id"), retried_keys))
        old = read_table(part, job.schema)
        kept = old.filter(pc.invert(pc.is_in(pa.array(row_units(old, job.unit_columns), pa.string()), retried_units)))
        merged = in_unit_order(pa.concat_tables([kept, new_rows]), job.units(shard), job.unit_columns)
        self.fence(index)
        write_table(merged, part, job.schema, job.row_group_size)
        old_errors = read_table(errors_part, ERRORS)
        errors = pa.concat_tables([old_errors.filter(pc.invert(pc.is_in(old_errors.column("item_id"), retried_keys))),
                                   new_errors])
        write_table(errors, errors_part, ERRORS)
        _add_stats(self.totals, result)
        self.totals.items_retried += len(subset)
        self.log.info("%s: retried %d failed item(s) of shard %d: %d now done", self.ctx.stage, len(subset), index,
                      len(subset) - len(set(new_errors.column("item_id").to_pylist())))

    # ----------------------------------------------------------------------------- passes
    def unusable(self, index: int) -> str | None:
        """Why a committed shard cannot be kept (its part, errors or inputs file is empty or cut), or None."""
        part = self.folder / part_name(index)
        records = [self.folder / "_errors" / part_name(index)]
        if self.job.input_fields is not None:
            records.append(self.folder / INPUTS_DIR / inputs_name(index))
        for path in (part, *records):
            if path is not part and not path.exists():
                if path.parent.name == INPUTS_DIR:
                    return f"{path.relative_to(self.folder)} is missing"
                continue  # a shard committed before its errors file existed has none
            if (problem := unreadable(path)) is not None:
                return problem if path is part else f"{path.relative_to(self.folder)}: {problem}"
        return None

    def committed_ok(self, index: int) -> bool:
        return (self.folder / part_name(index)).exists() and self.unusable(index) is None

    def due_retries(self, index: int) -> set[str]:
        shard = self.split.shards[index]
        return retryable_ids(self.folder / "_errors" / part_name(index), self.ctx.dataset_root) & \
            {self.job.item_id(w) for w in shard}

    def one_pass(self, indices: list[int]) -> list[int]:
        """Compute, retry or keep each shard; returns those another worker holds."""
        busy = []
        for index in indices:
            shard = self.split.shards[index]
            if self.committed_ok(index) and not self.due_retries(index):
                self.totals.shards_resumed += 1
                self.bar.skip(len(shard))
                continue
            if not self.claims.acquire(shard_claim(index)):
                busy.append(index)
                continue
            handed_to_writer = False
            try:
                started = time.perf_counter()
                part = self.folder / part_name(index)
                if self.committed_ok(index):  # retryable failures (re-checked: another worker may have retried)
                    subset_ids = self.due_retries(index)
                    subset = [w for w in shard if self.job.item_id(w) in subset_ids]
                    if subset:
                        self.retry(index, subset)
                    else:
                        self.totals.shards_resumed += 1
                    self.bar.skip(len(shard) - len(subset))
                    self.bar.update(len(subset))
                    continue
                if part.exists():
                    self.log.warning("%s: committed shard %s is unusable (%s): computing it again", self.label, part,
                                     self.unusable(index))
                    part.unlink()
                    self.totals.shards_recomputed += 1
                commit = self.compute(index)
                if self.writer is None:
                    commit()
                else:
                    self.writer.submit(partial(self._commit_then_release, commit, index))
                    handed_to_writer = True
                self.totals.shards_done += 1
                if "tokens" in self.totals.stats:
                    self.bar.set_postfix(f"{self.totals.stats['tokens'] / (time.perf_counter() - self.bar.started):.0f} tokens/s")
                self.bar.update(len(shard))
                self.log.debug("%s: shard %d committed (%.2fs)", self.label, index, time.perf_counter() - started)
            finally:
                if not handed_to_writer:
                    self.claims.release(shard_claim(index))
        return busy

    def _commit_then_release(self, commit: Callable[[], None], index: int) -> None:
        try:
            commit()
        finally:
            self.claims.release(shard_claim(index))

    def run(self) -> ShardTotals:
        ctx, job, plan = self.ctx, self.job, self.split.shards
        slot = ctx.shard_slot
        mine = [i for i in range(len(plan)) if slot is None or i % slot[1] == slot[0]]
        if self.split.reused_units:
            self.log.info("%s: %d of %d %s to compute, %d reused from earlier artifacts", self.label,
                          self.split.computed_units, len(job.work), job.unit, self.split.reused_units)
        try:
            with progress(total=len(job.work), desc=self.label, unit=job.unit, logger=self.log) as self.bar, \
                    _closing(self.writer):
                self.bar.skip(len(job.work) - sum(len(plan[i]) for i in mine))  # other slots' shards
                waiting = self.one_pass(mine)
                while waiting:  # shards another worker is computing: wait for them, or take over if it dies
                    time.sleep(0.5)
                    waiting = self.one_pass(waiting)
        finally:
            self.claims.release_all()
        totals = self.totals
        if totals.shards_resumed:
            self.log.info("%s: kept %d finished shard(s) of %d; computed %d%s", self.label, totals.shards_resumed,
                          len(plan), totals.shards_done,
                          f", retried {totals.items_retried} failed item(s)" if totals.items_retried else "")
        if slot is not None:
            return totals
        return self.finish()

    def finish(self) -> ShardTotals:
        """Merge the shards' error rows into errors.parquet; fail past the error rate."""
        job, totals, folder = self.job, self.totals, self.folder
        committed = sorted(folder.glob("part-*.parquet"))
        totals.rows = sum(_num_rows(p) for p in committed)
        error_parts = sorted((folder / "_errors").glob("part-*.parquet"))
        all_errors = read_table(error_parts, ERRORS) if error_parts else ERRORS.empty_table()
        totals.errors = all_errors.num_rows
        totals.retryable_errors = sum(all_errors.column("retryable").to_pylist())
        write_table(all_errors, folder / "errors.parquet", ERRORS)
        units = job.error_base if job.error_base is not None else len(job.work)
        what = job.error_unit or job.unit
        if job.max_error_rate is not None and units and totals.errors / units > job.max_error_rate:
            reasons = all_errors.column("reason").to_pylist()[:3]
            final = totals.errors - totals.retryable_errors
            advice = []
            if totals.retryable_errors:
                advice.append(f"a rerun retries the {totals.retryable_errors} retryable failure(s) (missing or "
                              "unreadable files, engine errors) and nothing else")
            if final:
                advice.append(f"{'the other ' if totals.retryable_errors else ''}{final} are final for this input: "
                              "a rerun does not retry them; a fixed "
                              f"input or a higher {self.ctx.stage.split('-')[0]}.max_error_rate lets the stage finish")
            raise StageFailed(
                f"{self.label}: {totals.errors} of {units} {what} failed "
                f"({totals.errors / units:.1%} > max_error_rate {job.max_error_rate:.1%}); "
                f"first reasons: {reasons}; all in {folder / 'errors.parquet'}. "
                f"{len(committed)} finished shard(s) are kept; " + "; ".join(advice) + "."
            )
        return totals
