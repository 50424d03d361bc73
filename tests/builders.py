"""Hand-built artifacts for stage tests that should not depend on a dataset adapter."""
import json
from pathlib import Path

import pyarrow as pa

from leccr.core.artifact import Artifact
from schemas.core import write_table
from schemas.dataset import CAPTIONS, ITEMS


def dataset_artifact(folder: Path, items: list[dict], captions: list[dict], languages: list[str],
                     key: str = "handmade") -> Artifact:
    """A complete `dataset` artifact: items.parquet, captions.parquet and a manifest naming the languages."""
    folder.mkdir(parents=True, exist_ok=True)
    items = [{"feature_path": None, "path": None, "media_type": "image", **row} for row in items]
    captions = [{"kind": "human", **row} for row in captions]
    write_table(pa.Table.from_pylist(items, schema=ITEMS), folder / "items.parquet", ITEMS)
    write_table(pa.Table.from_pylist(captions, schema=CAPTIONS), folder / "captions.parquet", CAPTIONS)
    return finish_handmade("dataset", folder, key, config={"languages": languages})


def finish_handmade(stage: str, folder: Path, key: str, **manifest) -> Artifact:
    """Mark a hand-built folder complete: a manifest with the content digest downstream keys hash."""
    from leccr.core.artifact import content_digest

    manifest = {"config": {}, "rows": {}, "summary": {}, **manifest, "content_digest": content_digest(folder)}
    (folder / "_manifest.json").write_text(json.dumps(manifest))
    return Artifact(stage, key, folder)
