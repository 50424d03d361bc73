"""Artifact keys: what a stage's output is named by.

`key = hash(stage, its code identity, its config section as the stage really uses it, what its
upstream artifacts hold, STORE_FORMAT)` — Hugging Face `datasets` fingerprints and DVC's stage lock in
one. `KeyParts` keeps every part, so the manifest can record them and a new key can say why it is new.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

from pydantic import BaseModel

from leccr.config import Section, _PathMarker
from leccr.core.fingerprint import Fingerprinter

KEY_LENGTH = 16  # hex digits of sha256 kept in folder names
# The layout of artifact folders (shard names, manifest fields). Part of every key: bump it when the
# store writes results differently, since the store itself is not part of any stage's code identity.
STORE_FORMAT = "4"  # 4: items carry media digests, one train artifact per method, row memo files


def resolve_section(section: BaseModel, fingerprints: Fingerprinter) -> dict[str, Any]:
    """A section as its stage really uses it, as plain JSON data.

    Left out: `NON_OUTPUT_FIELDS` (batch sizes, devices, thresholds) and the fields the section's
    current choices leave unused (`Section.unused_fields`: the other engine's settings). Content
    paths become `{"content": <fingerprint>}`, so moving a model keeps the key and editing it does not;
    a Hugging Face hub id (`org/name[@rev]`, no such local path) is its cached snapshot's content plus
    `{"hub": repo, revision, commit}`.
    """

    def walk(model: BaseModel, where: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        skip = set(getattr(model, "NON_OUTPUT_FIELDS", frozenset()))
        if isinstance(model, Section):
            skip |= model.unused_fields()
        for name, info in type(model).model_fields.items():
            if name in skip:
                continue
            is_path = any(isinstance(meta, _PathMarker) for meta in info.metadata) or _mentions_path(info.annotation)
            out[name] = convert(getattr(model, name), is_path, f"{where}{name}")
        return out

    def convert(value: Any, is_path: bool, where: str) -> Any:
        if isinstance(value, BaseModel):
            return walk(value, where + ".")
        if isinstance(value, dict):
            return {str(k): convert(v, is_path, f"{where}.{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(v, is_path, where) for v in value]
        if is_path and isinstance(value, str):
            return path_identity(value, fingerprints, where)
        if value is None or isinstance(value, (str, int, float, bool)):
            return value
        raise TypeError(f"cannot hash config value {value!r} of type {type(value).__name__}")

    return walk(section, "")


def path_identity(value: str, fingerprints: Fingerprinter, where: str = "") -> dict[str, Any]:
    """What a content path holds: a local file or folder by content, or a hub id's cached snapshot."""
    from leccr.hub import parse_hub_id, resolve_model

    if Path(value).expanduser().exists() or parse_hub_id(value) is None:
        try:
            return {"content": fingerprints.path(Path(value).expanduser())}
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{where}: {error}" if where else str(error)) from None
    try:
        resolved = resolve_model(value)  # ModelNotFound says how to get it
    except FileNotFoundError as error:
        raise type(error)(f"{where}: {error}" if where else str(error)) from None
    return {"content": fingerprints.path(resolved.path), "hub": resolved.identity}


def _mentions_path(annotation: Any) -> bool:
    """True when a type is ContentPath or holds it (Optional[ContentPath], dict[str, ContentPath], ...)."""
    if get_origin(annotation) is Annotated and any(isinstance(m, _PathMarker) for m in annotation.__metadata__):
        return True
    return any(_mentions_path(arg) for arg in get_args(annotation))


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class KeyParts:
    """Everything a stage output's key hashes; the manifest keeps each part, so a new key can say why."""

    stage: str
    code: str  # digest over leccr.core.codeid.code_modules of the configured stage
    config: dict[str, Any]  # the section as the stage uses it (resolve_section, plus stage extras)
    upstream: dict[str, str]  # upstream stage -> content digest of the artifact it read
    # {module: digest} behind `code`, kept in the manifest so a new key can name the changed modules
    code_modules: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def key(self) -> str:
        payload = canonical_json({"stage": self.stage, "store_format": STORE_FORMAT, "code": self.code,
                                  "config": self.config, "upstream": dict(sorted(self.upstream.items()))})
        return hashlib.sha256(payload.encode()).hexdigest()[:KEY_LENGTH]

    @property
    def memo_salt(self) -> str:
        """The key without its upstream part: two artifacts with the same salt ran the same code with
        the same effective config, so an item whose own input is unchanged has the same output rows in
        both (`leccr.core.memo`)."""
        payload = canonical_json({"stage": self.stage, "store_format": STORE_FORMAT, "code": self.code,
                                  "config": self.config})
        return hashlib.sha256(payload.encode()).hexdigest()[:KEY_LENGTH]
