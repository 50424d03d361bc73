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
# 5: model names in keys and rows, memo salts per unit (views, languages), rows without unkeyed values
STORE_FORMAT = "5"


def resolve_section(section: BaseModel, fingerprints: Fingerprinter) -> dict[str, Any]:
    """A section as its stage really uses it, as plain JSON data.

    Left out: `NON_OUTPUT_FIELDS` (batch sizes, devices, thresholds) and the fields the section's
    current choices leave unused (`Section.unused_fields`: the other engine's settings). Content
    paths become `{"content": <fingerprint>}`, so moving a model keeps the key and editing it does not;
    a Hugging Face hub id (`org/name[@rev]`, no such local path) is its cached snapshot's content plus
    `{"hub": repo, revision, commit}`. A `NamedPath` (a model whose name rows record) adds its name.
    """

    def walk(model: BaseModel, where: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        skip = set(getattr(model, "NON_OUTPUT_FIELDS", frozenset()))
        if isinstance(model, Section):
            skip |= model.unused_fields()
        for name, info in type(model).model_fields.items():
            if name in skip:
                continue
            marker = _path_marker(info.metadata) or _path_marker_in(info.annotation)
            out[name] = convert(getattr(model, name), marker, f"{where}{name}")
        return out

    def convert(value: Any, marker: _PathMarker | None, where: str) -> Any:
        if isinstance(value, BaseModel):
            return walk(value, where + ".")
        if isinstance(value, dict):
            return {str(k): convert(v, marker, f"{where}.{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(v, marker, where) for v in value]
        if marker is not None and isinstance(value, str):
            return path_identity(value, fingerprints, where, named=marker.named)
        if value is None or isinstance(value, (str, int, float, bool)):
            return value
        raise TypeError(f"cannot hash config value {value!r} of type {type(value).__name__}")

    return walk(section, "")


def path_identity(value: str, fingerprints: Fingerprinter, where: str = "", named: bool = False) -> dict[str, Any]:
    """What a content path holds: a local file or folder by content, or a hub id's cached snapshot;
    `named`: its name too (`display_name`), for a model or file whose name rows record."""
    from leccr.runtime.hub import parse_hub_id, resolve_model

    name = {"name": display_name(value)} if named else {}
    if Path(value).expanduser().exists() or parse_hub_id(value) is None:
        try:
            return {"content": fingerprints.path(Path(value).expanduser()), **name}
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{where}: {error}" if where else str(error)) from None
    try:
        resolved = resolve_model(value)  # ModelNotFound says how to get it
    except FileNotFoundError as error:
        raise type(error)(f"{where}: {error}" if where else str(error)) from None
    return {"content": fingerprints.path(resolved.path), "hub": resolved.identity, **name}


def display_name(value: str) -> str:
    """The name rows record for a model or file: a local path's last part, a hub id as written."""
    from leccr.runtime.hub import parse_hub_id

    path = Path(value).expanduser()
    if path.exists() or parse_hub_id(value) is None:
        return path.absolute().name
    return value


def _path_marker(metadata: Any) -> _PathMarker | None:
    return next((m for m in metadata if isinstance(m, _PathMarker)), None)


def _path_marker_in(annotation: Any) -> _PathMarker | None:
    """The path marker of a type that is a content path or holds one (Optional[NamedPath], dict[str, ContentPath], ...)."""
    if get_origin(annotation) is Annotated and (marker := _path_marker(annotation.__metadata__)) is not None:
        return marker
    return next((m for arg in get_args(annotation) if (m := _path_marker_in(arg)) is not None), None)


def _without(config: dict[str, Any], dotted: tuple[str, ...]) -> dict[str, Any]:
    """`config` without the given fields; "a.b" drops b from the mapping a."""
    out = dict(config)
    for name in dotted:
        head, _, rest = name.partition(".")
        if head not in out:
            continue
        if not rest:
            del out[head]
        elif isinstance(out[head], dict):
            out[head] = _without(out[head], (rest,))
    return out


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
    # Config fields left out of the memo salt (StageDef.memo_excludes; "a.b" for a field of a
    # mapping): each unit's input digest carries its own share of them (a view's prompt, a language),
    # they only choose which units exist or how they are sharded (splits, shard sizes), or no row
    # records them (a model's name that only an info file names).
    salt_excludes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def key(self) -> str:
        payload = canonical_json({"stage": self.stage, "store_format": STORE_FORMAT, "code": self.code,
                                  "config": self.config, "upstream": dict(sorted(self.upstream.items()))})
        return hashlib.sha256(payload.encode()).hexdigest()[:KEY_LENGTH]

    @property
    def own_digest(self) -> str:
        """The key without its upstream part: what the job itself adds (a sweep's pending identities)."""
        payload = canonical_json({"stage": self.stage, "store_format": STORE_FORMAT, "code": self.code,
                                  "config": self.config})
        return hashlib.sha256(payload.encode()).hexdigest()[:KEY_LENGTH]

    @property
    def memo_salt(self) -> str:
        """What every unit's output depends on besides its own input: the key without its upstream part
        and without `salt_excludes`. Two artifacts with the same salt ran the same code with the same
        shared config, so a unit whose own input digest is unchanged has the same output rows in both
        (`leccr.core.memo`)."""
        config = _without(self.config, self.salt_excludes)
        payload = canonical_json({"stage": self.stage, "store_format": STORE_FORMAT, "code": self.code,
                                  "config": config})
        return hashlib.sha256(payload.encode()).hexdigest()[:KEY_LENGTH]
