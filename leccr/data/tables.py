"""Open the three sub-tables of a features artifact memory-mapped, as Arrow tables and numpy views.

Parquet pages are compressed and encoded, so no reader can hand out pointers into a Parquet file
itself. Two ways are offered:

- `arrow_cache` (default): each `part-*.parquet` is converted once into an uncompressed Arrow IPC
  file under `<artifact>/.arrow-cache/<sub-table>/` (a hidden folder: the manifest, DuckDB globs and
  the cache key never see it), and that file is opened with `pa.memory_map`. Every later open — each
  epoch, each DataLoader worker — maps the same pages: no decoding, no copy, shared page cache, and a
  table larger than RAM still works. The cache file name holds the part's size and mtime, so a
  rewritten part is converted again.
- `arrow_cache=False` (or a read-only artifact): `pq.read_table(memory_map=True)` decodes each part
  once into Arrow memory (C++ buffers, not Python objects).

Either way the array columns are then read through `RowViews` (numpy views over Arrow buffers), which
`torch.from_numpy` wraps without copying.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from leccr.core.io import temporary_name
from leccr.features.storage import RowViews
from leccr.schemas.core import validate
from leccr.schemas.features import TEXT_TOKENS, description_schema, visual_schema

log = logging.getLogger(__name__)

INFO_FILE = "features_info.json"
CACHE_FOLDER = ".arrow-cache"
SUB_TABLES = ("visual", "text", "descriptions")


def _arrow_file(part: Path, cache_dir: Path) -> Path:
    """The uncompressed Arrow IPC copy of one Parquet part, written once (temp file + rename)."""
    stat = part.stat()
    target = cache_dir / f"{part.stem}-{stat.st_size}-{stat.st_mtime_ns}.arrow"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(target)  # per process and thread: two trainings may convert the same part at once
    parquet = pq.ParquetFile(part)
    with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, parquet.schema_arrow) as writer:
        for group in range(parquet.num_row_groups):  # one record batch per row group: bounded memory
            writer.write_table(parquet.read_row_group(group))
    os.replace(tmp, target)
    return target


def open_parts(parts: list[Path], cache_dir: Path | None) -> pa.Table | None:
    """Concatenate the parts (zero-copy: one chunk per record batch); None when there are none."""
    tables = []
    for part in parts:
        if cache_dir is not None:
            tables.append(ipc.open_file(pa.memory_map(str(_arrow_file(part, cache_dir)), "r")).read_all())
        else:
            tables.append(pq.read_table(part, memory_map=True))
    if not tables:
        return None
    return pa.concat_tables(tables)


def _writable(folder: Path) -> bool:
    probe = folder
    while not probe.exists():
        probe = probe.parent
    return os.access(probe, os.W_OK)


def column_numpy(table: pa.Table, name: str) -> np.ndarray:
    """A primitive column as one numpy array (chunks joined: small per-row metadata only)."""
    column = table.column(name)
    if column.num_chunks == 1:
        return column.chunk(0).to_numpy(zero_copy_only=False)
    return column.to_numpy()


@dataclass
class FeatureTables:
    """The sub-tables of one features artifact with row views over their array columns.

    visual: item_id/split/n_tokens/dim + `visual_values` (RowViews over `features`).
    text: caption rows + `text_ids`; descriptions: + `desc_ids` (+ `desc_states` when cached).
    `empty_description`: the ids (and states) of an empty description, for filling in.
    """

    root: Path
    info: dict
    visual: pa.Table
    text: pa.Table
    descriptions: pa.Table | None
    empty_description: pa.Table
    _split_items: dict[str, tuple[np.ndarray, list[str]]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @classmethod
    def open(cls, root: str | Path, arrow_cache: bool = True) -> FeatureTables:
        root = Path(root)
        info_path = root / INFO_FILE
        if not info_path.is_file():
            raise FileNotFoundError(f"{root} is not a finished features artifact: {INFO_FILE} is missing")
        info = json.loads(info_path.read_text(encoding="utf-8"))
        if arrow_cache and not _writable(root / CACHE_FOLDER):
            log.info("%s is read-only: decoding Parquet into memory instead of an Arrow cache", root)
            arrow_cache = False
        tables = {}
        for sub in SUB_TABLES:
            cache_dir = root / CACHE_FOLDER / sub if arrow_cache else None
            tables[sub] = open_parts(sorted((root / sub).glob("part-*.parquet")), cache_dir)
        visual, text = tables["visual"], tables["text"]
        if visual is None:
            raise FileNotFoundError(f"{root / 'visual'} holds no part-*.parquet: no visual features")
        if text is None:
            raise FileNotFoundError(f"{root / 'text'} holds no part-*.parquet: no caption tokens")
        features_type = visual.schema.field("features").type
        dtype = "float16" if features_type.value_type == pa.float16() else "float32"
        fixed = features_type.list_size if pa.types.is_fixed_size_list(features_type) else None
        # Schema checks on an empty slice: names and types, without casting (a cast could copy).
        validate(visual.slice(0, 0), visual_schema(dtype, fixed), str(root / "visual"))
        validate(text.slice(0, 0), TEXT_TOKENS, str(root / "text"))
        empty = pq.read_table(root / "descriptions" / "empty.parquet")
        states_dtype = info["descriptions"].get("states_dtype") if info["descriptions"].get("states") else None
        desc_schema = description_schema(states_dtype)
        validate(empty.slice(0, 0), desc_schema, str(root / "descriptions" / "empty.parquet"))
        if tables["descriptions"] is not None:
            validate(tables["descriptions"].slice(0, 0), desc_schema, str(root / "descriptions"))
        out = cls(root, info, visual, text, tables["descriptions"], empty)
        out._build_views()
        return out

    def _build_views(self) -> None:
        self.visual_values = RowViews(self.visual.column("features"))
        self.visual_n_tokens = column_numpy(self.visual, "n_tokens").astype(np.int64)
        self.visual_dim = column_numpy(self.visual, "dim").astype(np.int64)
        self.text_ids = RowViews(self.text.column("input_ids"))
        self.has_states = bool(self.info["descriptions"].get("states"))
        if self.descriptions is not None and self.descriptions.num_rows:
            self.desc_ids = RowViews(self.descriptions.column("input_ids"))
            self.desc_states = RowViews(self.descriptions.column("states")) if self.has_states else None
            self.desc_dim = column_numpy(self.descriptions, "dim").astype(np.int64) if self.has_states else None
        else:
            self.desc_ids = self.desc_states = self.desc_dim = None
        self.empty_ids = RowViews(self.empty_description.column("input_ids"))[0]
        self.empty_states = None
        if self.has_states:
            dim = int(self.empty_description.column("dim")[0].as_py())
            self.empty_states = RowViews(self.empty_description.column("states"))[0].reshape(-1, dim)

    def split_items(self, split: str) -> tuple[np.ndarray, list[str]]:
        """(rows of `visual` in `split`, their item ids) in table order. Computed once per split: a
        collection encoded chunk by chunk asks for it at every chunk. Read-only: callers slice it."""
        if split not in self._split_items:
            rows = np.flatnonzero(pc.equal(self.visual.column("split"), split).to_numpy(zero_copy_only=False))
            self._split_items[split] = (rows, self.visual.column("item_id").take(rows).to_pylist())
        return self._split_items[split]

    @cached_property
    def description_row_of(self) -> dict[str, int]:
        """item_id -> its row of `descriptions` (built once, like `split_items`)."""
        if self.descriptions is None:
            return {}
        return {item_id: row for row, item_id in enumerate(self.descriptions.column("item_id").to_pylist())}

    @property
    def pad_token_id(self) -> int:
        return int(self.info["pad_token_id"])

    def visual_tokens(self, row: int) -> np.ndarray:
        """[n_tokens, dim] view of one visual row (no copy)."""
        return self.visual_values[row].reshape(self.visual_n_tokens[row], self.visual_dim[row])

    def description(self, row: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(ids [L], states [L, D] or None) of description row `row`; -1 = the empty description."""
        if row < 0:
            return self.empty_ids, self.empty_states
        ids = self.desc_ids[row]
        states = self.desc_states[row].reshape(len(ids), self.desc_dim[row]) if self.desc_states is not None else None
        return ids, states
