"""The one interface every dataset adapter implements, the registry, and the shared reading helpers.

An adapter turns a dataset folder in its *published* layout into two tables (schemas/dataset.py):
items (one row per image or video) and captions (one row per caption and language). Adapters never
raise on the first bad line: they collect every `Problem` (file, line, message) while reading, so
`leccr datasets check` can list them all, and `read` raises one `DatasetFormatError` naming each.
A problem that costs one item or caption (a bad line, a missing media file) is not `fatal`: the
dataset stage writes it to its errors.parquet and goes on with the rest.

Media paths in the items table are relative to the dataset root (`leccr.media.paths.resolve_media_path` resolves them
against the configured root at use), so a moved dataset folder with the same content keeps working.
"""
from __future__ import annotations

import gzip
import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, get_args

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, ValidationError

from leccr.schemas.dataset import CAPTIONS, SOURCE_ITEMS

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".gif"})
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})


# ------------------------------------------------------------------------------------ errors
@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset folder. `line` is 1-based; None when the whole file is at fault."""

    file: str
    line: int | None
    message: str
    # The item or caption id this problem costs ("" when the line names none). None: the problem is
    # about a whole file or the folder, and no dataset can be built around it (fatal).
    item: str | None = None

    @property
    def fatal(self) -> bool:
        return self.item is None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}" if self.line is not None else f"{self.file}: {self.message}"


class DatasetFormatError(ValueError):
    """A dataset folder does not match its format. The message lists every problem as `file:line: message`."""

    def __init__(self, fmt: str, root: Path, problems: list[Problem]):
        self.problems = list(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{fmt} dataset at {root} has {len(self.problems)} problem(s):\n{lines}")


class DatasetOptionsError(ValueError):
    """An unknown format, an unknown adapter option, or a bad option value."""


# ------------------------------------------------------------------------------------ tables
@dataclass
class DatasetTables:
    items: pa.Table  # leccr.schemas.dataset.SOURCE_ITEMS
    captions: pa.Table  # leccr.schemas.dataset.CAPTIONS

    def items_per_split(self) -> dict[str, dict[str, int]]:
        """{split: {media_type: count}}"""
        counts: dict[str, dict[str, int]] = {}
        for split, media in zip(self.items.column("split").to_pylist(), self.items.column("media_type").to_pylist()):
            counts.setdefault(split, {}).setdefault(media, 0)
            counts[split][media] += 1
        return counts

    def captions_per_split(self) -> dict[str, dict[str, dict[str, int]]]:
        """{split: {lang: {kind: count}}}"""
        counts: dict[str, dict[str, dict[str, int]]] = {}
        cols = [self.captions.column(c).to_pylist() for c in ("split", "lang", "kind")]
        for split, lang, kind in zip(*cols):
            by_kind = counts.setdefault(split, {}).setdefault(lang, {})
            by_kind[kind] = by_kind.get(kind, 0) + 1
        return counts


class TableBuilder:
    """Collects item and caption rows, reporting duplicates, unknown items and empty texts as problems."""

    def __init__(self, problems: list[Problem], human_target_splits: list[str] | None = None):
        self.problems = problems
        # Splits whose human non-English captions are kept (None: all). The CCR setting trains on MT
        # target-language captions only, and a human translation of an English caption would share
        # (caption_id, lang) with its MT caption.
        self.human_target_splits = None if human_target_splits is None else set(human_target_splits)
        self.items: dict[str, dict[str, Any]] = {}
        self.item_where: dict[str, str] = {}
        self.captions: list[dict[str, str]] = []
        self.caption_where: dict[tuple[str, str], str] = {}
        self.failed_items: set[str] = set()  # items already reported (missing media...): not reported again
        self.excluded_items: set[str] = set()  # in the release but left out by an option: their captions are skipped

    def add_item(self, item_id: str, split: str, media_type: str, path: Path | None,
                 feature_path: Path | None, file: str, line: int | None) -> bool:
        where = f"{file}:{line}" if line is not None else file
        if item_id in self.items:
            first = self.items[item_id]
            if first["split"] != split:
                self.problems.append(Problem(file, line, f"item {item_id!r} is in split {split!r} here but already "
                                                         f"in split {first['split']!r} ({self.item_where[item_id]})",
                                             item_id))
            else:
                self.problems.append(Problem(file, line, f"item {item_id!r} listed twice "
                                                         f"(first at {self.item_where[item_id]})", item_id))
            return False
        # Absolute here; `Adapter.check` makes them relative to the dataset root.
        self.items[item_id] = {"item_id": item_id, "split": split, "media_type": media_type,
                               "path": None if path is None else str(Path(path).absolute()),
                               "feature_path": None if feature_path is None else str(Path(feature_path).absolute())}
        self.item_where[item_id] = where
        return True

    def add_caption(self, item_id: str, caption_id: str, lang: str, text: str, kind: str,
                    file: str, line: int | None) -> bool:
        item = self.items.get(item_id)
        if item is None:
            self.problems.append(Problem(file, line, f"caption {caption_id!r} belongs to item {item_id!r}, "
                                                     "which is in no split list", caption_id))
            return False
        if (kind == "human" and lang != "en" and self.human_target_splits is not None
                and item["split"] not in self.human_target_splits):
            return False
        # Stored as read (byte for byte): whitespace a tokenizer does not want is dropped at feature
        # time (`leccr.features.text.model_text`), never here. Whitespace alone is no caption.
        if not text.strip():
            self.problems.append(Problem(file, line, f"empty {lang} caption {caption_id!r}", caption_id))
            return False
        key = (caption_id, lang)
        if key in self.caption_where:
            self.problems.append(Problem(file, line, f"{lang} caption {caption_id!r} given twice "
                                                     f"(first at {self.caption_where[key]})", caption_id))
            return False
        self.caption_where[key] = f"{file}:{line}" if line is not None else file
        self.captions.append({"item_id": item_id, "caption_id": caption_id, "split": item["split"],
                              "lang": lang, "text": text, "kind": kind})
        return True

    def has_caption(self, caption_id: str, lang: str) -> bool:
        return (caption_id, lang) in self.caption_where

    def tables(self, languages: list[str] | None) -> DatasetTables:
        """The two tables; captions restricted to English + `languages` (None keeps every language)."""
        keep = None if languages is None else {"en", *languages}
        captions = [c for c in self.captions if keep is None or c["lang"] in keep]
        return DatasetTables(pa.Table.from_pylist(list(self.items.values()), schema=SOURCE_ITEMS),
                             pa.Table.from_pylist(captions, schema=CAPTIONS))


# ------------------------------------------------------------------------------------ reading helpers
def rel(path: Path, root: Path) -> str:
    """`path` as shown in messages: relative to the dataset root when inside it."""
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def under(root: Path, path: str) -> Path:
    """A path option: relative to the dataset root, or absolute."""
    return Path(path) if Path(path).is_absolute() else root / path


def find_text_file(path: Path) -> Path | None:
    """`path` or, as the multi30k-dataset repository ships them, `path.gz`."""
    if path.is_file():
        return path
    gz = path.with_name(path.name + ".gz")
    return gz if gz.is_file() else None


def read_lines(path: Path, root: Path, problems: list[Problem], what: str = "file",
               required: bool = True,
               item_of: Callable[[int, str], str | None] | None = None) -> list[str | None] | None:
    """Lines of a UTF-8 text file (plain or .gz), without line ends. A missing file is a problem if required.

    A UTF-8 byte-order mark is dropped and blank lines at the end of the file are ignored (editors
    add them). A line that is not valid UTF-8 comes back as None and is reported with its line number;
    `item_of(line number, text with U+FFFD for the bad bytes)` names the item or caption it costs.
    """
    found = find_text_file(path)
    if found is None:
        if required:
            problems.append(Problem(rel(path, root), None, f"missing {what} (also looked for {path.name}.gz)"))
        return None
    try:
        raw = gzip.decompress(found.read_bytes()) if found.suffix == ".gz" else found.read_bytes()
    except (OSError, EOFError) as error:
        problems.append(Problem(rel(found, root), None, f"cannot read {what}: {error}"))
        return None
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    byte_lines = raw.split(b"\n")
    while byte_lines and not byte_lines[-1].strip():
        byte_lines.pop()  # the final newline ends the last line; trailing blank lines are not lines
    lines: list[str | None] = []
    for number, data in enumerate(byte_lines, 1):
        try:
            lines.append(data.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as error:
            text = data.decode("utf-8", errors="replace").rstrip("\r")
            item = (item_of(number, text) if item_of is not None else None) or ""
            problems.append(Problem(rel(found, root), number, f"not valid UTF-8: byte 0x{data[error.start]:02x} at "
                                                               f"column {error.start + 1} ({what})", item))
            lines.append(None)
    return lines


def read_json(path: Path, root: Path, problems: list[Problem], what: str = "file", required: bool = True) -> Any:
    if not path.is_file():
        if required:
            problems.append(Problem(rel(path, root), None, f"missing {what}"))
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        problems.append(Problem(rel(path, root), error.lineno, f"not valid JSON: {error.msg} (column {error.colno})"))
    except (OSError, UnicodeDecodeError) as error:
        problems.append(Problem(rel(path, root), None, f"cannot read {what}: {error}"))
    return None


# `<item-id>#enc#<n> <caption>`: the caption-file format of the CCR releases (NRCCR, CCLM, LECCR). MT
# files use `#enc2<lang>#<n>` for the translation of English caption `#enc#<n>`. The id ends at the
# first space or tab; everything after that one separator is the caption, as it is in the file.
_CCR_LINE = re.compile(r"^(\S+#\S+)[ \t](.*\S.*)$")
_MT_MARK = re.compile(r"#enc2[a-z]{2}(?:-[a-zA-Z]+)?#")


def parse_ccr_line(line: str) -> tuple[str, str] | None:
    """(caption_id, text) of a `<item-id>#<tag>#<n> <caption>` line, or None if malformed. The text
    keeps every character after the separator (leading, trailing and repeated spaces included)."""
    match = _CCR_LINE.match(line)
    return (match.group(1), match.group(2)) if match else None


def ccr_item_id(caption_id: str) -> str:
    """`1000092795.jpg#enc#0` -> `1000092795` (releases sometimes keep the file extension)."""
    item = caption_id.split("#", 1)[0]
    return strip_media_extension(item)


def english_id_of_mt(caption_id: str) -> str:
    """`x#enc2de#3` -> `x#enc#3`: the id of the English caption an MT caption translates."""
    item, _, rest = caption_id.partition("#")
    return f"{strip_media_extension(item)}#{_MT_MARK.sub('#enc#', '#' + rest)[1:]}"


_MEDIA_EXTENSIONS = VIDEO_EXTENSIONS | IMAGE_EXTENSIONS


def strip_media_extension(name: str) -> str:
    stem, suffix = os.path.splitext(name)  # not pathlib: called once per caption line of big files
    return stem if suffix.lower() in _MEDIA_EXTENSIONS else name


def media_type_of(path: str | Path) -> str:
    return "video" if Path(path).suffix.lower() in VIDEO_EXTENSIONS else "image"


class FeatureIndex:
    """Pre-extracted visual features, in either layout a release ships them:

    - a folder of per-item arrays, `<item_id>.npy` (VATEX's official I3D features, most re-releases);
    - a BigFile folder (`id.txt`, `shape.txt`, `feature.bin`, as NRCCR's FeatureData/<name>/), whose
      `id.txt` lists the ids (per item, or per frame with `video2frames.txt` mapping item -> frames).
    `feature_path(item_id)` is the absolute `.npy` file, or the BigFile folder (the row is found by id).
    """

    def __init__(self, folder: Path, root: Path, problems: list[Problem]):
        self.folder = folder
        self.bigfile_ids: set[str] | None = None
        if not folder.is_dir():
            problems.append(Problem(rel(folder, root), None, "missing features folder"))
            self.ok = False
            return
        self.ok = True
        if (folder / "id.txt").is_file():
            ids = set((folder / "id.txt").read_text(encoding="utf-8").split())
            video2frames = folder / "video2frames.txt"
            if video2frames.is_file():
                # NRCCR writes it as a Python dict literal {video_id: [frame ids]}; the keys are items.
                ids |= set(re.findall(r"['\"]([^'\"]+)['\"]\s*:", video2frames.read_text(encoding="utf-8")))
            self.bigfile_ids = ids

    def feature_path(self, item_id: str) -> Path | None:
        if not self.ok:
            return None
        if self.bigfile_ids is not None:
            return self.folder if item_id in self.bigfile_ids else None
        path = self.folder / f"{item_id}.npy"
        return path if path.is_file() else None


def resolve_media(builder: TableBuilder, root: Path, item_id: str, media: Path, features: FeatureIndex | None,
                  file: str, line: int | None) -> tuple[Path | None, Path | None] | None:
    """(path, feature_path) of an item; a problem (and None) when neither the media file nor features exist."""
    if item_id in builder.failed_items:
        return None
    feature = features.feature_path(item_id) if features is not None else None
    if media.is_file():
        return media, feature
    if feature is not None:
        return None, feature  # only features were released / kept: path is null
    builder.failed_items.add(item_id)
    if features is not None and features.ok:
        builder.problems.append(Problem(file, line, f"item {item_id!r}: neither media file {rel(media, root)} "
                                                    f"nor features in {rel(features.folder, root)}", item_id))
    else:
        builder.problems.append(Problem(file, line, f"item {item_id!r}: missing media file {rel(media, root)}",
                                        item_id))
    return None


def _relative_paths(items: pa.Table, root: Path) -> pa.Table:
    """items with `path` / `feature_path` relative to `root` (kept absolute when outside it)."""
    for name in ("path", "feature_path"):
        values = [None if v is None else _relative_to(v, root) for v in items.column(name).to_pylist()]
        items = items.set_column(items.schema.get_field_index(name), name, pa.array(values, pa.string()))
    return items


def _relative_to(path: str, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return path


# ------------------------------------------------------------------------------------ adapters
@dataclass(frozen=True)
class PathOption:
    """Marks an adapter option that names a file or folder the adapter reads: relative to the dataset
    root (or to the folder another option names, `relative_to`), or absolute. The value may be one
    path, a list of them or a dict whose values are paths. The dataset stage's key holds the content
    of each one that lies outside the dataset root (leccr.stages.dataset.key_config): inside it, the
    root's own fingerprint has it. `placeholders`: the option is a pattern, filled with each of the
    adapter's values of those names (`Adapter.placeholder_values`: its splits, the configured languages).
    """

    placeholders: tuple[str, ...] = ()
    relative_to: str | None = None


# An option naming a file or folder (see PathOption).
DatasetPath = Annotated[str, PathOption()]


def path_options(options: type[BaseModel]) -> dict[str, PathOption]:
    """{option: its PathOption} of the options that name files."""
    marked = {}
    for name, info in options.model_fields.items():
        found = next((m for m in info.metadata if isinstance(m, PathOption)), None) or _marker(info.annotation)
        if found is not None:
            marked[name] = found
    return marked


def _marker(annotation: Any) -> PathOption | None:
    """The PathOption a type carries, also inside a union (`DatasetPath | None`)."""
    for meta in getattr(annotation, "__metadata__", ()):
        if isinstance(meta, PathOption):
            return meta
    return next((m for m in map(_marker, get_args(annotation)) if m is not None), None)


class AdapterOptions(BaseModel):
    """Base of every adapter's options: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Folder (relative to the dataset root, or absolute) of pre-extracted visual features: per-item
    # `<item_id>.npy` files or a BigFile folder. None: raw images/videos only.
    features: DatasetPath | None = None
    # Splits whose human target-language (non-English) captions are read. CCR trains on MT captions
    # only, so by default human ja/zh/de... captions of the training split are left out.
    human_target_splits: list[str] = ["val", "test"]


class Adapter:
    """One published dataset layout. Subclasses set `format`, `Options`, and implement `collect`."""

    format: ClassVar[str]
    Options: ClassVar[type[AdapterOptions]] = AdapterOptions
    description: ClassVar[str] = ""

    def parse_options(self, options: dict | None) -> AdapterOptions:
        try:
            return self.Options(**(options or {}))
        except ValidationError as error:
            known = ", ".join(sorted(self.Options.model_fields))
            messages = []
            for e in error.errors():
                key = ".".join(str(p) for p in e["loc"]) or "options"
                if e["type"] == "extra_forbidden":
                    messages.append(f"unknown option {key!r} (known: {known})")
                else:
                    messages.append(f"option {key!r}: {e['msg']} (got {e.get('input')!r})")
            raise DatasetOptionsError(f"{self.format} dataset: " + "; ".join(messages)) from None

    def collect(self, root: Path, options: AdapterOptions, languages: list[str] | None,
                problems: list[Problem]) -> DatasetTables:
        """Read the folder, appending every problem found; return what could be read."""
        raise NotImplementedError

    def placeholder_values(self, options: AdapterOptions, languages: list[str]) -> dict[str, list[str]]:
        """The values `collect` fills each placeholder of its pattern options with (`PathOption`)."""
        return {"lang": list(languages)}

    def named_paths(self, root: Path, options: dict | None, languages: list[str]) -> list[tuple[str, Path]]:
        """(label, absolute path) of every file or folder the options name (`PathOption`), patterns
        filled as `collect` fills them; whether each exists is the caller's question. The label is the
        option's name, followed by `[value]` where the option names several paths."""
        opts = self.parse_options(options)
        root = Path(root).absolute()
        values = self.placeholder_values(opts, list(languages))
        found: list[tuple[str, Path]] = []
        for name, marker in path_options(type(opts)).items():
            value = getattr(opts, name)
            if value is None:
                continue
            base = root if marker.relative_to is None else under(root, getattr(opts, marker.relative_to))
            written = list(value.values()) if isinstance(value, dict) else value if isinstance(value, list) else [value]
            several = not isinstance(value, str) or bool(marker.placeholders)
            for pattern in written:
                for filled in self._filled(name, pattern, marker.placeholders, values):
                    found.append((f"{name}[{filled}]" if several else name, under(base, filled)))
        return found

    def _filled(self, option: str, pattern: str, placeholders: tuple[str, ...],
                values: dict[str, list[str]]) -> list[str]:
        if not placeholders:
            return [pattern]
        filled = []
        for combination in itertools.product(*(values.get(name, []) for name in placeholders)):
            try:
                filled.append(pattern.format(**dict(zip(placeholders, combination))))
            except (KeyError, IndexError, ValueError) as error:
                raise DatasetOptionsError(f"{self.format} dataset: option {option!r}: {pattern!r} is not a pattern "
                                          f"of {', '.join('{' + p + '}' for p in placeholders)} ({error})") from None
        return sorted(set(filled))

    def check(self, root: Path, options: dict | None = None,
              languages: list[str] | None = None) -> tuple[DatasetTables, list[Problem]]:
        """Read the folder without raising on format problems: (tables read, problems found).

        `languages`: target languages to keep besides English; None keeps every language found.
        Option errors still raise `DatasetOptionsError` (they are the caller's mistake, not the folder's).
        """
        opts = self.parse_options(options)
        root = Path(root).absolute()
        problems: list[Problem] = []
        if not root.is_dir():
            problems.append(Problem(str(root), None, "dataset folder does not exist"))
            return TableBuilder(problems).tables(languages), problems
        tables = self.collect(root, opts, languages, problems)
        tables.items = _relative_paths(tables.items, root)
        found = set(tables.captions.column("lang").to_pylist())
        for lang in ["en", *(languages or [])]:
            if lang not in found:
                problems.append(Problem(str(root), None, f"no {lang} captions found (languages present: "
                                                         f"{', '.join(sorted(found)) or 'none'})"))
        if tables.items.num_rows == 0:
            problems.append(Problem(str(root), None, "no items found"))
        return tables, problems

    def read(self, root: Path, options: dict | None, languages: list[str] | None) -> DatasetTables:
        """The folder's tables; raises `DatasetFormatError` listing every problem if there is any."""
        tables, problems = self.check(root, options, languages)
        if problems:
            raise DatasetFormatError(self.format, Path(root), problems)
        return tables


ADAPTERS: dict[str, type[Adapter]] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    ADAPTERS[cls.format] = cls
    return cls


# One module per format, imported only when that format is used: a stage's code identity then holds
# the configured adapter alone (see `adapter_module` and stages/dataset.py), not every layout we read.
ADAPTER_MODULES = {
    "mscoco": "leccr.datasets.mscoco",
    "msrvtt_cn": "leccr.datasets.msrvtt_cn",
    "multi30k": "leccr.datasets.multi30k",
    "vatex": "leccr.datasets.vatex",
}


def list_formats() -> list[str]:
    return sorted(ADAPTER_MODULES)


def adapter_module(fmt: str) -> str:
    """The module that reads dataset format `fmt`."""
    if fmt not in ADAPTER_MODULES:
        raise DatasetOptionsError(f"unknown dataset format {fmt!r}; known formats: {', '.join(list_formats())}")
    return ADAPTER_MODULES[fmt]


def get_adapter(fmt: str) -> Adapter:
    import importlib

    importlib.import_module(adapter_module(fmt))  # importing registers it
    return ADAPTERS[fmt]()


def load_dataset(format: str, root: Path, languages: list[str], options: dict | None = None) -> DatasetTables:
    """Read the dataset folder `root` in layout `format` into items + captions (English + `languages`)."""
    return get_adapter(format).read(Path(root), options or {}, list(languages))


def read_mt_file(path: Path, root: Path, lang: str, builder: TableBuilder, id_map: dict[str, str] | None = None) -> int:
    """Add the MT captions of one CCR-release file (`<item>#enc2<lang>#<n> <text>` lines); returns how many.

    Each line must translate an English caption the dataset has (`<item>#enc#<n>`): the MT caption
    takes that caption's id, as schemas/dataset.py asks. `id_map` renames the file's item ids to ours.
    """
    lines = read_lines(path, root, builder.problems, what=f"{lang} MT caption file", item_of=line_caption_id)
    added = 0
    file = rel(path, root)
    for number, line in enumerate(lines or [], 1):
        if line is None or not line.strip():
            continue
        parsed = parse_ccr_line(line)
        if parsed is None:
            builder.problems.append(Problem(file, number,
                                            f"expected '<item-id>#enc2{lang}#<n> <caption>', got {line[:80]!r}",
                                            line_caption_id(number, line) or ""))
            continue
        english_id = english_id_of_mt(parsed[0])
        if id_map is not None:
            item, _, rest = english_id.partition("#")
            if item not in id_map:
                builder.problems.append(Problem(file, number, f"item id {item!r} is not in the id map", parsed[0]))
                continue
            english_id = f"{id_map[item]}#{rest}"
        if ccr_item_id(english_id) in builder.excluded_items or ccr_item_id(english_id) in builder.failed_items:
            continue
        if not builder.has_caption(english_id, "en"):
            builder.problems.append(Problem(file, number, f"{parsed[0]!r} translates English caption "
                                                                     f"{english_id!r}, which the dataset does not have",
                                            parsed[0]))
            continue
        added += builder.add_caption(ccr_item_id(english_id), english_id, lang, parsed[1], "mt", file, number)
    return added


def line_caption_id(number: int, line: str) -> str | None:
    """The caption id a `<item-id>#<tag>#<n> <caption>` line starts with (also for a line with bad bytes)."""
    head = line.split(maxsplit=1)
    return head[0] if head and "#" in head[0] else None
