"""Hand-built artifacts for stage tests that should not depend on a dataset adapter."""

import json
from pathlib import Path

import pyarrow as pa

from leccr.core.artifact import Artifact
from leccr.schemas.core import write_table
from leccr.schemas.dataset import CAPTIONS, ITEMS


def dataset_artifact(
    folder: Path, items: list[dict], captions: list[dict], languages: list[str], key: str = "handmade"
) -> Artifact:
    """A complete `dataset` artifact: items.parquet, captions.parquet and a manifest naming the languages."""
    folder.mkdir(parents=True, exist_ok=True)
    items = [{"feature_path": None, "path": None, "media_type": "image", **row} for row in items]
    captions = [{"kind": "human", **row} for row in captions]
    write_table(pa.Table.from_pylist(items, schema=ITEMS), folder / "items.parquet", ITEMS)
    write_table(pa.Table.from_pylist(captions, schema=CAPTIONS), folder / "captions.parquet", CAPTIONS)
    return finish_handmade("dataset", folder, key, config={"languages": languages})


def finish_handmade(stage: str, folder: Path, key: str, **fields) -> Artifact:
    """Mark a hand-built folder complete: a manifest with the file digests downstream keys hash."""
    from leccr.core.artifact import Manifest, combined_digest, file_digests
    from leccr.core.fingerprint import files_under, hash_file
    from leccr.core.keys import STORE_FORMAT
    from leccr.schemas.core import SCHEMA_VERSION

    digests = file_digests(folder)
    files = [entry for entry in files_under(folder) if entry.relative != "_manifest.json"]
    manifest = Manifest(
        stage=stage,
        key=key,
        store_format=STORE_FORMAT,
        schema_version=SCHEMA_VERSION,
        code_digest="handmade",
        file_digests=digests,
        content_digest=combined_digest(digests),
        file_sizes={e.relative: e.stat.st_size for e in files},
        file_hashes={e.relative: hash_file(e.absolute) for e in files},
        **fields,
    )
    (folder / "_manifest.json").write_text(json.dumps(manifest.model_dump(mode="json")))
    return Artifact(stage, key, folder)
