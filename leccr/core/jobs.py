"""Jobs and their keys: what one artifact is made of, and why a key is new.

A job is a stage, or one method of a per-method stage (train: one job, and one artifact, per method).
Its key parts (`key_parts`) hash the stage's code, its section as the stage uses it, and what its
upstream artifacts hold; `why_new` compares them with the artifact the experiment used before and says
what changed, in one line per reason (`--dry-run -v` lists every field).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from leccr.config import ExperimentConfig
from leccr.core.artifact import Artifact, Manifest, MethodArtifacts, Store, library_versions
from leccr.core.codeid import code_modules
from leccr.core.dag import get_stage
from leccr.core.fingerprint import Fingerprinter
from leccr.core.keys import STORE_FORMAT, KeyParts, resolve_section
from leccr.core.stage import StageDef

Input = Artifact | MethodArtifacts


@dataclass(frozen=True)
class Job:
    """One artifact to make: a stage, or one method of a per-method stage."""

    stage: str
    method: str | None = None

    @property
    def label(self) -> str:
        return f"{self.stage}[{self.method}]" if self.method else self.stage

    @classmethod
    def from_label(cls, label: str) -> Job:
        stage, _, rest = label.partition("[")
        return cls(stage, rest[:-1] or None)


def as_job(job: Job | str) -> Job:
    """A stage name stands for its one job (tests and scripts run single stages by name)."""
    return Job(job) if isinstance(job, str) else job


def jobs_of(cfg: ExperimentConfig, name: str) -> list[Job]:
    if get_stage(name).per_method:
        return [Job(name, method) for method in cfg.train.methods]
    return [Job(name)]


def config_for(cfg: ExperimentConfig, job: Job) -> ExperimentConfig:
    """The experiment as one job sees it: a per-method job sees its own method only, so its key holds
    that method's model and nothing of the others'."""
    if job.method is None:
        return cfg
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"methods": [job.method]})})


def stage_code_modules(stage: StageDef, cfg: ExperimentConfig) -> dict[str, str]:
    """{module: digest} of every project module the configured stage runs (leccr.core.codeid)."""
    modules = dict(code_modules(stage.module))
    for extra in stage.code_for(cfg) if stage.code_for is not None else ():
        modules.update(code_modules(extra))
    return dict(sorted(modules.items()))


def _code_digest(modules: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{name}\0{digest}\n" for name, digest in modules.items()).encode()).hexdigest()


def key_parts(cfg: ExperimentConfig, job: Job | str, inputs: dict[str, Input], fingerprints: Fingerprinter) -> KeyParts:
    """What a job's key hashes, given its finished upstream artifacts."""
    job = as_job(job)
    stage = get_stage(job.stage)
    missing = [up for up in stage.upstream if up not in inputs]
    if missing:
        raise ValueError(f"stage {job.stage!r} needs upstream artifact(s) {missing}")
    return parts_with_upstream(cfg, job, fingerprints, {up: inputs[up].digest_of(stage.reads[up]) for up in stage.upstream})


def parts_with_upstream(cfg: ExperimentConfig, job: Job, fingerprints: Fingerprinter,
                        upstream: dict[str, str]) -> KeyParts:
    """A job's key parts around given upstream digests (a pending job in a dry run: the previous ones)."""
    stage = get_stage(job.stage)
    job_cfg = config_for(cfg, job)
    config = resolve_section(stage.section(job_cfg), fingerprints)
    if stage.key_config is not None:
        config |= stage.key_config(job_cfg, fingerprints)
    modules = stage_code_modules(stage, job_cfg)
    return KeyParts(stage=job.stage, code=_code_digest(modules), config=config, upstream=upstream,
                    code_modules=modules, salt_excludes=stage.memo_excludes)


# ------------------------------------------------------------------------------------- reasons
def previous_manifest(store: Store, experiment: str, job: Job) -> dict[str, Any] | None:
    """The manifest of the artifact this experiment last used for a job (else the stage's latest)."""
    record = store.root / "runs" / f"{experiment}.json"
    if record.is_file():
        key = json.loads(record.read_text(encoding="utf-8")).get(job.label)
        if key is not None and store.is_complete(artifact := store.artifact(job.stage, key)):
            return _raw_manifest(artifact)
    latest = store.latest(job.stage, job.method)
    return _raw_manifest(latest) if latest is not None else None


def _raw_manifest(artifact: Artifact) -> dict[str, Any] | None:
    try:
        return json.loads((artifact.path / "_manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _flatten(data: Any, prefix: str) -> dict[str, Any]:
    if isinstance(data, dict) and data and "content" not in data:  # {"content": ...}: one path, a leaf
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}"))
        return out
    return {prefix: data}


_ABSENT = object()
_SHOWN_CHARS = 60  # of a changed value, unless every field is asked for: a miss reads as one line
_BARE = re.compile(r"[\w.+\-/:@]+")


def _show(value: Any, whole: bool = True) -> str:
    """A key field's value as a reason shows it: a word-like string bare (`transformers`), anything else
    as JSON (`["train", "val"]`, `null`, `"two words"`), shortened to _SHOWN_CHARS unless `whole`."""
    if value is _ABSENT:
        return "(unset)"
    if isinstance(value, str) and _BARE.fullmatch(value) and value not in ("null", "true", "false"):
        try:
            float(value)
        except ValueError:
            text = value
        else:
            text = json.dumps(value)  # "1" stays a string
    elif isinstance(value, dict) and "content" in value and not whole:  # a content path's identity
        text = "(a path's content)"
    else:
        text = json.dumps(value, ensure_ascii=False, default=str)
    return text if whole or len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS - 1] + "…"


def _engine_fields(old: dict[str, Any], new: dict[str, Any], config_section: str) -> set[str]:
    """The fields that come and go with a switch of the section's engine (the fields one engine keys and
    the other does not), or none when the engine did not change."""
    engine = f"{config_section}.engine"
    if old.get(engine, _ABSENT) == new.get(engine, _ABSENT):
        return set()
    return {dotted for dotted in set(old) ^ set(new) if dotted != engine}


def why_new(parts: KeyParts, previous: dict[str, Any] | None, config_section: str,
            every_field: bool = False) -> list[str]:
    """Why a key differs from the previous artifact's: changed fields, content, code or upstream.

    An engine switch names itself (`describe.engine: transformers → import`) and counts the fields only
    one of the two engines uses instead of listing them; `every_field` lists them, with whole values."""
    if previous is None:
        return ["no earlier artifact of this stage"]
    reasons: list[str] = []
    if previous.get("store_format") != STORE_FORMAT:
        return [f"made by an older store format ({previous.get('store_format', '1')} → {STORE_FORMAT})"]
    if previous.get("code_digest") != parts.code:
        before, now = previous.get("code_modules", {}), parts.code_modules
        changed = sorted(m for m in set(before) | set(now) if before.get(m) != now.get(m))
        reasons.append("code changed" + (f": {', '.join(changed)}" if changed and before else ""))
    old = _flatten(previous.get("key_config") or {}, config_section)
    new = _flatten(parts.config, config_section)
    folded = set() if every_field else _engine_fields(old, new, config_section)
    for dotted in sorted(set(old) | set(new)):
        before, after = old.get(dotted, _ABSENT), new.get(dotted, _ABSENT)
        if before == after or dotted in folded:
            continue
        if isinstance(before, dict) and isinstance(after, dict):  # {"content": digest, ...} on both sides
            if before.get("content") != after.get("content"):
                reasons.append(f"{dotted}: content changed")
            if before.get("name") != after.get("name"):
                reasons.append(f"{dotted}: renamed {_show(before.get('name', _ABSENT))} → {_show(after.get('name', _ABSENT))}")
            if before.get("content") == after.get("content") and before.get("name") == after.get("name"):
                reasons.append(f"{dotted}: {_show(before)} → {_show(after)}")
        else:
            reasons.append(f"{dotted}: {_show(before, every_field)} → {_show(after, every_field)}")
            if folded and dotted == f"{config_section}.engine":
                reasons[-1] += f" (+{len(folded)} fields of one engine only; --dry-run -v lists them)"
    before_up = previous.get("upstream_digests", {})
    for up, digest in sorted(parts.upstream.items()):
        if before_up.get(up) != digest:
            reasons.append(f"upstream {up} changed")
    return reasons or ["key changed"]


def version_drift(manifest: Manifest) -> list[str]:
    """Libraries whose installed version differs from the one that made an artifact (a warning only:
    the key leaves versions out, or every upgrade would recompute everything)."""
    now = library_versions()
    return [f"{name} {manifest.versions.get(name)} → {now.get(name)}" for name in sorted(manifest.versions)
            if manifest.versions.get(name) != now.get(name)]
