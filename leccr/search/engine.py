"""Search an index artifact: query text -> candidates by global cosine -> the method's inference score.

    engine = SearchEngine.open("artifacts")            # the latest index (or experiment=NAME's)
    hits = engine.search(["ein Hund rennt durch den Schnee"], lang="de", method="leccr", k=10)[0]

1. the query through the method's own text side (`QueryEncoder`: its tokenizer, max_length);
2. `candidates` items from the vector index (exact or FAISS) by global cosine;
3. those re-scored with the method's inference score — for LECCR alpha·minmax(global) +
   (1−alpha)·minmax(slot), with the min/max fixed at index time (index.json) — and the best k kept.
   Ties go to the item indexed first, as evaluate's stable sort; so with candidates ≥ the collection
   the order is exactly evaluate's fused ranking (tests/test_search.py).

Each method's model loads once, on first use, behind a lock; searches run concurrently after that.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from leccr.search.request import DEFAULT_CANDIDATES, UnknownLanguage, UnknownMethod
from leccr.core.artifact import Artifact, Store
from leccr.schemas.core import read_table
from leccr.schemas.index import INDEX_ITEMS

if TYPE_CHECKING:  # torch loads with the first model (MethodIndex.load): opening an index and checking a
    import torch   # request stay cheap, so `leccr search` refuses a bad one in well under a second

    from leccr.search.query import QueryEncoder


@dataclass
class Hit:
    rank: int
    item_id: str
    score: float  # the method's inference score (the fused score; the global cosine when alpha = 1)
    global_score: float  # the global cosine
    split: str
    media_type: str
    path: str | None  # relative to the dataset root
    captions: list[dict]  # {"lang", "kind", "text"}: the dataset's captions of the item
    description: str | None  # the MLLM description(s)
    description_engine: str | None = None  # the describe engine that wrote it (transformers | vllm | import)
    description_model: str | None = None  # its model (folder name) or import file name
    description_random_weights: bool | None = None  # made by a tiny random-weight model: noise, not a description

    @property
    def description_source(self) -> str | None:
        """Where the description comes from, in words, e.g. "transformers · llava (random weights: ...)"."""
        if self.description is None or self.description_engine is None:
            return None
        text = self.description_engine + (f" · {self.description_model}" if self.description_model else "")
        if self.description_random_weights:
            text += " (a tiny random-weight test model: its text is noise, not a description)"
        return text

    def caption(self, lang: str) -> str:
        """One caption to show: in the query's language if the item has one, else English, else any."""
        for wanted in (lang, "en"):
            for caption in self.captions:
                if caption["lang"] == wanted:
                    return caption["text"]
        return self.captions[0]["text"] if self.captions else ""

    def to_dict(self, lang: str) -> dict:
        return {**asdict(self), "caption": self.caption(lang), "description_source": self.description_source}


class IndexItems(Sequence):
    """The index's items.parquet rows as dicts, made when asked for: the table stays in Arrow memory, so a
    server process holds its 20 captions per item (620k rows at Multi30K's size) as a few buffers, not as
    Python objects, and a search builds only its k hits' rows."""

    def __init__(self, table: pa.Table):
        self.table = table.combine_chunks()

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, row: int) -> dict:  # type: ignore[override]
        if not -len(self) <= row < len(self):
            raise IndexError(f"item row {row} out of range ({len(self)} items)")
        return self.table.slice(row % len(self), 1).to_pylist()[0]

    def __iter__(self):
        for batch in self.table.to_batches(max_chunksize=4096):
            yield from batch.to_pylist()


class MethodIndex:
    """One method of an index artifact: its query encoder, embeddings, vector index and score setup."""

    def __init__(self, info: dict, encoder: QueryEncoder, vectors: np.ndarray, slots: torch.Tensor | None, ann):
        import torch

        self.info, self.encoder, self.ann = info, encoder, ann
        self.vectors = torch.from_numpy(vectors)
        self.slots = slots
        self.alpha = float(info["alpha"])

    @classmethod
    def load(cls, folder: Path, method_dir: Path, device: torch.device | str = "cpu") -> MethodIndex:
        import torch

        from leccr.config import HnswConfig, IvfConfig
        from leccr.search.query import QueryEncoder
        from leccr.engines.vectors import ExactIndex, FaissIndex, faiss_missing

        info = json.loads((folder / "index.json").read_text(encoding="utf-8"))
        table = pq.read_table(folder / "embeddings.parquet")
        vectors = _matrix(table, "embedding", info["embed_dim"])
        slots = None
        if info["alpha"] < 1.0:
            slots = torch.from_numpy(_matrix(table, "slots", info["num_slots"] * info["embed_dim"])
                                     ).reshape(len(vectors), info["num_slots"], info["embed_dim"])
        if info["ann"] is None:
            ann = ExactIndex(vectors)
        else:
            if reason := faiss_missing():
                raise RuntimeError(f"{folder} was indexed with FAISS ({info['ann']['kind']}), but {reason}")
            config = (IvfConfig if info["ann"]["kind"] == "ivf" else HnswConfig).model_validate(info["ann"])
            ann = FaissIndex.load(folder, config)
        encoder = QueryEncoder.load(method_dir, info["max_length"], info["languages"], device)
        return cls(info, encoder, vectors, slots, ann)

    def rank(self, queries: torch.Tensor, lang: str, k: int, candidates: int) -> list[list[tuple[int, float, float]]]:
        """Per query: (row, inference score, global cosine) of the best k items, best first."""
        import torch

        from leccr.models.base import fuse_scores, similarity_parts

        _, found = self.ann.search(queries.numpy(), max(k, candidates))
        ranges = None
        if self.alpha < 1.0:
            stored = self.info["ranges"]
            ranges = {part: tuple(bounds) for part, bounds in stored.get(lang, stored["*"]).items()}
        results = []
        for query, rows in zip(queries, found):
            rows = torch.from_numpy(np.sort(rows[rows >= 0]))  # index order: ties go to the lower row
            global_sim, slot_sim = similarity_parts(query[None], self.vectors[rows],
                                                    self.slots[rows] if ranges is not None else None)
            score = fuse_scores(global_sim, slot_sim, self.alpha, ranges)[0] if ranges is not None else global_sim[0]
            order = torch.argsort(-score, stable=True)[:k]
            results.append([(int(rows[i]), float(score[i]), float(global_sim[0, i])) for i in order])
        return results


def _matrix(table, column: str, width: int) -> np.ndarray:
    values = table.column(column).combine_chunks().values.to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.float32).reshape(-1, width)


def find_index(root: str | Path = "artifacts", experiment: str | None = None) -> Artifact:
    """The index artifact of an experiment's last run, or the latest one built in this store."""
    from leccr.records.sql import selected_artifacts

    artifact = selected_artifacts(root, experiment).get("index")
    if artifact is None:
        where = f"experiment {experiment!r}" if experiment else f"{Path(root).absolute()}"
        raise FileNotFoundError(f"no index artifact for {where}: run `leccr run --config ... --stage index` first")
    return artifact


class SearchEngine:
    """An index artifact's methods (each loaded on first use, once), its items, and its media folder."""

    def __init__(self, index_dir: Path, method_dirs: dict[str, Path], data_root: Path | None, device: str = "auto"):
        """`method_dirs`: each indexed method's trained model folder (its train artifact's method folder)."""
        self.index_dir, self.method_dirs = Path(index_dir), {m: Path(d) for m, d in method_dirs.items()}
        self.data_root = Path(data_root).resolve() if data_root is not None else None
        self.device_name = device  # resolved with the first model load (it needs torch)
        self.methods = sorted(p.name for p in self.index_dir.iterdir() if (p / "index.json").is_file())
        self.infos = {m: json.loads((self.index_dir / m / "index.json").read_text(encoding="utf-8"))
                      for m in self.methods}
        self.items = IndexItems(read_table(self.index_dir / "items.parquet", INDEX_ITEMS))
        paths, media = self.items.table.column("path").to_pylist(), self.items.table.column("media_type").to_pylist()
        self.media_types = {path: kind for path, kind in zip(paths, media) if path is not None}
        self._loaded: dict[str, MethodIndex] = {}
        self._lock = threading.Lock()
        self.loads = 0  # models loaded so far (each method at most once)

    @classmethod
    def open(cls, root: str | Path = "artifacts", experiment: str | None = None, data_root: str | Path | None = None,
             device: str = "auto") -> SearchEngine:
        """From the artifact store: the index, the train artifacts it was built from, the dataset folder
        (where the dataset artifact was read from, unless `data_root` says where it lies now)."""
        index = find_index(root, experiment)
        store = Store(root)
        upstream = index.manifest.upstream
        if data_root is None:
            try:
                data_root = store.artifact("dataset", upstream["dataset"]).manifest.config.get("path")
            except (OSError, ValueError):
                data_root = None
        method_dirs = {label[len("train["):-1]: store.artifact("train", key).path / label[len("train["):-1]
                       for label, key in upstream.items() if label.startswith("train[")}
        return cls(index.path, method_dirs, data_root, device)

    def check(self, method: str, lang: str) -> None:
        """Raise UnknownMethod / UnknownLanguage with the choices, before any model loads."""
        if method not in self.infos:
            raise UnknownMethod(f"method {method!r} is not in the index {self.index_dir} (methods: {self.methods})")
        languages = self.infos[method]["languages"]
        if lang not in languages:
            raise UnknownLanguage(f"language {lang!r} is not one {method} was trained on: {languages}")

    def method(self, name: str) -> MethodIndex:
        with self._lock:
            if name not in self._loaded:
                if name not in self.infos:
                    raise UnknownMethod(f"method {name!r} is not in the index {self.index_dir} (methods: {self.methods})")
                from leccr.runtime.device import resolve_device

                self._loaded[name] = MethodIndex.load(self.index_dir / name, self.method_dirs[name],
                                                      resolve_device(self.device_name))
                self.loads += 1
            return self._loaded[name]

    def search(self, texts: list[str], lang: str, method: str, k: int = 10,
               candidates: int = DEFAULT_CANDIDATES) -> list[list[Hit]]:
        self.check(method, lang)
        index = self.method(method)
        queries = index.encoder.encode_queries(texts, lang)
        return [[self._hit(rank, row, score, global_score) for rank, (row, score, global_score) in enumerate(hits, 1)]
                for hits in index.rank(queries, lang, k, candidates)]

    def _hit(self, rank: int, row: int, score: float, global_score: float) -> Hit:
        item = self.items[row]
        return Hit(rank, item["item_id"], score, global_score, item["split"], item["media_type"], item["path"],
                   item["captions"], item["description"], item.get("description_engine"),
                   item.get("description_model"), item.get("description_random_weights"))

    def media_file(self, relative: str, media_type: str | None = None) -> Path | None:
        """The media file of an indexed item (of `media_type` when given) at `relative` inside the dataset
        folder; None for any other path — another file of the folder, one outside it, or a missing file.
        Only the item paths of items.parquet are looked up, so no request path reaches the filesystem."""
        if self.data_root is None or self.media_types.get(relative) not in ((media_type,) if media_type else
                                                                             ("image", "video")):
            return None
        path = (self.data_root / relative).resolve()
        if self.data_root not in path.parents or not path.is_file():
            return None
        return path
