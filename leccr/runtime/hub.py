"""Model fields name a local folder or a Hugging Face hub id, resolved here to a folder on disk.

    resolve_model("artifacts/demo/models/text")          -> that folder
    resolve_model("sentence-transformers/all-MiniLM-L6-v2")       -> its cached snapshot (refs/main)
    resolve_model("org/name@v1.0") / "org/name@<commit>"          -> the snapshot of that revision

A hub id is looked up only in the local huggingface_hub cache ($HF_HUB_CACHE, else $HF_HOME/hub, else
~/.cache/huggingface/hub), never downloaded: a run must not fetch gigabytes behind the user's back, and
with HF_HUB_OFFLINE=1 a cached snapshot works with no network. `identity` names what was resolved
(the snapshot's commit hash for a hub id) so the cache key can say which weights produced a result.
Every model loader goes through `resolve_model`, so folders and hub ids share one code path.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

# org/name with an optional @revision (branch, tag or commit); a bare name is a legacy hub id (gpt2).
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?)(?:@(?P<revision>[\w./-]+))?$")


class ModelNotFound(FileNotFoundError):
    """Neither a local folder nor a cached hub snapshot: the message says how to get the model."""


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # the folder (or file) that from_pretrained loads
    # {"source": "folder"} or {"source": "hub", "repo_id", "revision", "commit"}; the content of `path`
    # is fingerprinted by the store, this says where it came from.
    identity: dict = field(default_factory=dict)


def hub_cache_dir() -> Path:
    """The huggingface_hub cache as the environment names it now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """("org/name", "rev" or None) when `spec` is spelled like a hub id, else None."""
    match = _HUB_ID.match(spec.strip())
    if match is None:
        return None
    return match["repo"], match["revision"]


def resolve_model(spec: str | Path) -> ResolvedModel:
    """A model field's value -> the local folder to load, and what it is (see the module doc).

    An existing path wins over a hub id of the same spelling. Raises ModelNotFound with a one-line
    hint when it is neither an existing path nor a snapshot in the local hub cache."""
    path = Path(spec).expanduser()
    if path.exists():
        return ResolvedModel(path.absolute(), {"source": "folder"})
    parsed = parse_hub_id(str(spec))
    if parsed is None:
        raise ModelNotFound(f"no model folder at {spec}")
    repo_id, revision = parsed
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        snapshot = snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True)
    except LocalEntryNotFoundError:
        at = f" --revision {revision}" if revision else ""
        raise ModelNotFound(
            f"model {spec!r}: no folder of that name and no cached snapshot of hub model {repo_id}"
            f"{'@' + revision if revision else ''} in {cache}; get it with `hf download {repo_id}{at}` "
            f"(huggingface-cli download on older huggingface_hub) or give a local folder") from None
    snapshot = Path(snapshot)
    return ResolvedModel(snapshot, {"source": "hub", "repo_id": repo_id, "revision": revision or "main",
                                    "commit": snapshot.name})


def model_path(spec: str | Path, field_name: str | None = None) -> Path:
    """The folder to pass to `from_pretrained` for a model field's value; errors name the field."""
    try:
        return resolve_model(spec).path
    except ModelNotFound as error:
        raise ModelNotFound(f"{field_name}: {error}" if field_name else str(error)) from None
