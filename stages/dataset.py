"""dataset: read a dataset folder through its format adapter into `items.parquet` and `captions.parquet`.

Every later stage reads the dataset through this artifact, so its key (which fingerprints the
folder's content) is upstream of everything: editing an annotation file reruns the whole DAG. A file or
folder an adapter option names outside the folder (Flickr30k images kept apart from the Multi30K text,
`options.images: /data/flickr30k-images`) is fingerprinted too (`key_config`), so replacing an image
there reads the dataset again and gives that item a new media digest.

A bad line or a missing media file costs only its item or caption: it becomes a row of
`errors.parquet` (file, line, item, reason) and the rest is read, unless more than
`dataset.max_error_rate` of the rows are bad. A problem no dataset can be built around (a missing
caption file, a caption file out of step with its image list) stops the stage with every problem listed.
Media paths are stored relative to the dataset root (see `leccr.media.paths.resolve_media_path`),
and each item row carries the content digest of its media (and feature) file: the media's bytes count
in the keys of the stages that read items.parquet, and a per-item stage recomputes only the items whose
digest changed (one replaced image costs one image).
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from leccr.config import DatasetConfig, ExperimentConfig
from leccr.media.paths import resolve_media_path
from leccr.core.context import StageContext
from leccr.core.failures import StageFailed
from leccr.core.stage import StageDef
from leccr.schemas.dataset import CAPTIONS, ITEMS
from leccr.schemas.errors import ERRORS

MAX_PROBLEMS_IN_MESSAGE = 20  # `leccr datasets check` lists every one


def section(cfg: ExperimentConfig) -> DatasetConfig:
    return cfg.dataset


def cap_items(items: pa.Table, captions: pa.Table, per_split: int) -> tuple[pa.Table, pa.Table]:
    """Keep the first `per_split` items (by id) of each split, and their captions."""
    kept = []
    for split in sorted(set(items.column("split").to_pylist())):
        ids = sorted(pc.filter(items.column("item_id"), pc.equal(items.column("split"), split)).to_pylist())
        kept.extend(ids[:per_split])
    keep = pa.array(kept, pa.string())
    return (items.filter(pc.is_in(items.column("item_id"), keep)),
            captions.filter(pc.is_in(captions.column("item_id"), keep)))


def with_digests(items: pa.Table, root: Path, fingerprints) -> pa.Table:
    """items plus the content digest of each item's media and feature file (null where there is none:
    a missing file is the describing stages' error to report, with the item's name)."""
    def digest(stored: str | None) -> str | None:
        path = resolve_media_path(root, stored)
        if path is None or not Path(path).exists():
            return None
        return fingerprints.path(path)  # through the run's stat cache: the key already hashed these files

    columns = {name: items.column(name) for name in items.column_names}
    columns["media_digest"] = pa.array([digest(p) for p in items.column("path").to_pylist()], pa.string())
    columns["feature_digest"] = pa.array([digest(p) for p in items.column("feature_path").to_pylist()], pa.string())
    return pa.table(columns)


def _listed(problems: list, root: Path, what: str) -> str:
    shown = "\n".join(f"  {p}" for p in problems[:MAX_PROBLEMS_IN_MESSAGE])
    more = len(problems) - MAX_PROBLEMS_IN_MESSAGE
    tail = f"\n  ... and {more} more" if more > 0 else ""
    return f"{what}:\n{shown}{tail}\n`leccr datasets check {root} --format <format>` lists every problem"


def run(ctx: StageContext) -> None:
    from leccr.datasets import get_adapter

    cfg: DatasetConfig = ctx.section
    root = Path(cfg.path)
    tables, problems = get_adapter(cfg.format).check(root, cfg.options, cfg.languages)
    fatal = [p for p in problems if p.fatal]
    if fatal:
        raise StageFailed(_listed(fatal, root, f"dataset: {cfg.format} dataset at {root.absolute()} cannot be read "
                                               f"({len(fatal)} problem(s) no dataset can be built around)"))
    errors = pa.Table.from_pylist(
        [{"item_id": p.item, "stage": "dataset", "shard": -1, "reason": p.message, "file": p.file, "line": p.line,
          "retryable": False} for p in problems],  # a fixed folder has a new key: nothing to retry under this one
        schema=ERRORS)
    items, captions = tables.items, tables.captions
    rows = items.num_rows + captions.num_rows + errors.num_rows
    if rows and errors.num_rows / rows > cfg.max_error_rate:
        raise StageFailed(_listed(problems, root, f"dataset: {errors.num_rows} of {rows} dataset rows (items and "
                                                  f"captions) are bad ({errors.num_rows / rows:.1%} > "
                                                  f"dataset.max_error_rate {cfg.max_error_rate:.1%}); fix the folder "
                                                  "(a fixed folder has a new key) or raise dataset.max_error_rate"))
    if problems:
        ctx.log.warning("%s", _listed(problems, root, f"dataset: {len(problems)} bad row(s) skipped, in "
                                                    f"{ctx.out_dir / 'errors.parquet'}"))
    if cfg.max_items_per_split is not None:
        items, captions = cap_items(items, captions, cfg.max_items_per_split)
    items = with_digests(items.sort_by("item_id"), root, ctx.fingerprints())
    captions = captions.sort_by([("item_id", "ascending"), ("lang", "ascending"), ("caption_id", "ascending")])
    ctx.write("items.parquet", items, ITEMS)
    ctx.write("captions.parquet", captions, CAPTIONS)
    ctx.write("errors.parquet", errors, ERRORS)
    ctx.summary.update(
        format=cfg.format,
        items_per_split={s: items.column("split").to_pylist().count(s) for s in sorted(set(items.column("split").to_pylist()))},
        captions_per_lang={lang: captions.column("lang").to_pylist().count(lang)
                           for lang in sorted(set(captions.column("lang").to_pylist()))},
        errors=errors.num_rows,
    )


def key_config(cfg: ExperimentConfig, fingerprints) -> dict:
    """The content of each file or folder the adapter's options name (`PathOption`) outside
    dataset.path; inside it the folder's own fingerprint has them. A pattern counts each of its files
    that exists for the configured splits and languages, so a file appearing there changes the key too."""
    from leccr.datasets.base import get_adapter

    root = Path(cfg.dataset.path)
    outside = {}
    for label, path in get_adapter(cfg.dataset.format).named_paths(root, cfg.dataset.options, cfg.dataset.languages):
        if path.exists() and not _within(path, root):
            outside[label] = {"content": fingerprints.path(path)}  # through the run's stat cache
    return {"outside_files": outside} if outside else {}


def _within(path: Path, root: Path) -> bool:
    """Whether the root's fingerprint holds `path`: inside it, and not under a hidden name (the
    fingerprint skips those)."""
    try:
        relative = path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return not any(part.startswith(".") for part in relative.parts)


def adapter_code(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The configured format's adapter (imported by name when the stage runs, so no import names it)."""
    from leccr.datasets.base import adapter_module

    return (adapter_module(cfg.dataset.format),)


# preview: reading captions and stat-ing media is cheap, so a dry run computes it to plan downstream exactly
STAGE = StageDef(name="dataset", upstream=(), reads={}, section=section, run=run, key_config=key_config,
                 code_for=adapter_code, preview=True)
