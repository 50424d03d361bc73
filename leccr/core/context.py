"""What a stage function is given: its section, its upstream artifacts, and where to write."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from leccr.config import Section
from leccr.core.artifact import Artifact, MethodArtifacts, ReadView, part_name
from leccr.core.fingerprint import Fingerprinter, fingerprinter_for
from leccr.core.keys import KeyParts
from leccr.core.memo import RowMemo
from leccr.core.shards import MemoSplit, ShardJob, ShardRun, ShardTotals, memo_split
from leccr.schemas.core import write_table


@dataclass
class StageContext:
    """Everything a stage function may use: its section, its inputs, and where to write.

    Stages never see the whole experiment config: what shapes their output must be in their section
    (and so in their key). Upstream artifacts come as `ReadView`s of the files the stage declared.
    """

    stage: str
    key: str
    section: Section
    inputs: dict[str, ReadView | MethodArtifacts]
    out_dir: Path
    log: logging.Logger | logging.LoggerAdapter
    key_parts: KeyParts | None = None  # what the key hashes (the runner always gives it; the manifest records it)
    summary: dict[str, Any] = field(default_factory=dict)  # stage-specific facts for the manifest and log
    # (slot, slots): this process computes only shards with index % slots == slot and finalises
    # nothing — the scale-out runner maps a stage's shards onto several tasks this way, then one
    # ordinary run (every shard already committed) merges errors and writes the manifest.
    shard_slot: tuple[int, int] | None = None
    # The configured `dataset.path`: media paths in items.parquet are relative to it (see
    # `leccr.media.paths.resolve_media_path`), so a moved dataset folder keeps its cache and works.
    dataset_root: Path | None = None
    variant: str | None = None  # the method of a per-method stage
    # Earlier artifacts of this stage with the same code and effective config (newest first): the
    # row memo takes the rows of unchanged units from them.
    memo_sources: list[Artifact] = field(default_factory=list)
    # The run's fingerprinter (its digests already in memory); None: one for the artifact root is made
    fingerprinter: Fingerprinter | None = field(default=None, repr=False)
    memo_notes: list[str] = field(default_factory=list)  # memo sources skipped (damaged, other layout), for the log
    _splits: dict[str, MemoSplit] = field(default_factory=dict, repr=False)

    def write(self, name: str, table: pa.Table, schema: pa.Schema, row_group_size: int | None = None) -> Path:
        """Write one whole (non-sharded) Parquet file of this artifact atomically."""
        return write_table(table, self.out_dir / name, schema, row_group_size)

    def keyed(self, *path: str, otherwise: Callable[[], Any] | None = None) -> Any:
        """What the key counted for a config value, e.g. `keyed("model")` -> {"content": ..., "name": ...}:
        the identity rows record, so a row never names what the key did not count.

        The runner always gives the key's parts; a context made by hand (a test calling a stage
        function) has the section's own values resolved instead, or `otherwise()` for a stage extra."""
        if self.key_parts is not None:
            value: Any = self.key_parts.config
        elif otherwise is not None:
            return otherwise()
        else:
            from leccr.core.keys import resolve_section

            value = resolve_section(self.section, self.fingerprints())
        for part in path:
            value = value[part]
        return value

    def fingerprints(self) -> Fingerprinter:
        """The run's fingerprinter, else the artifact root's (content digests through its stat cache)."""
        if self.fingerprinter is None:
            self.fingerprinter = fingerprinter_for(self.out_dir.parents[1])
        return self.fingerprinter

    def next_shard(self, n_shards: int) -> Callable[[int], int | None]:
        """`next_shard(n)(index)`: the shard this process computes after `index` (its own slot's,
        skipping committed ones), or None: the one a prefetcher should decode next."""
        step = self.shard_slot[1] if self.shard_slot is not None else 1

        def after(index: int) -> int | None:
            candidate = index + step
            while candidate < n_shards and (self.out_dir / part_name(candidate)).exists():
                candidate += step
            return candidate if candidate < n_shards else None

        return after

    def plan_shards(self, job: ShardJob) -> MemoSplit:
        """The job's shards and, per shard, the units an earlier artifact gives (computed once per job):
        a stage that decodes media ahead builds its prefetcher over `to_compute` of each shard."""
        if job.subdir not in self._splits:
            memo = None
            if job.input_fields is not None and self.memo_sources:
                # A job built only to be counted (a dry run) may not know its final layout (visual's
                # fixed-size arrays need the model): its units' input digests say the layout instead.
                schema = job.schema if job.schema_final else None
                memo = RowMemo(self.memo_sources, job.subdir, schema, self.fingerprints())
                for skipped in memo.skipped:
                    self.log.warning("%s: row memo: %s", self.stage, skipped)
                self.memo_notes += memo.skipped
            self._splits[job.subdir] = memo_split(job, memo)
        return self._splits[job.subdir]

    def run_shards(self, job: ShardJob) -> ShardTotals:
        """Process `job.work` shard by shard, committing each as `part-NNNNN.parquet`; resume-safe.

        A committed shard (its part file exists and is readable) is kept, so a rerun after a crash or
        kill does only the missing shards; an empty or unreadable one is named in a warning and
        computed again. A committed shard whose `_errors/part-NNNNN.parquet` holds retryable failures
        that are due (the media file changed since it failed; no file: an engine error) is computed
        again for those items only; its good rows are kept. Past `job.max_error_rate` the stage fails,
        keeping every committed shard. Each shard is claimed first: a shard another live worker is
        computing is waited for, not computed twice. Units an earlier artifact already holds with the
        same input (the row memo) are copied, not computed.
        """
        totals = ShardRun(self, job, self.plan_shards(job)).run()
        previous = self.summary.get("reuse", {})
        previous[job.subdir or "rows"] = {"computed": totals.units_computed, "reused": totals.units_reused}
        self.summary["reuse"] = previous
        return totals
