"""The stage contract: each module of `stages/` ends with `STAGE = StageDef(...)`, checked at import.

One validated object rather than module attributes read with getattr: a misspelt field is a
TypeError when the module is imported, never a silent default.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any


WHOLE = "*"  # in a stage's reads: every file of that upstream artifact

if TYPE_CHECKING:
    from leccr.config import ExperimentConfig, Section
    from leccr.core.context import StageContext
    from leccr.core.fingerprint import Fingerprinter
    from leccr.core.shards import ShardJob


@dataclass(frozen=True, kw_only=True)
class StageDef:
    """One stage of the DAG.

    name:       the stage's name (its module's name, its folder under the artifact root).
    upstream:   the stages whose artifacts `run` reads.
    reads:      for each upstream stage, the files of its artifact `run` opens: names, folders ending
                in "/", or "*" for all. The key hashes exactly these, and the stage sees nothing else.
    section:    the stage's config section, as the stage will use it.
    run:        computes the artifact into `ctx.out_dir` (the runner writes the manifest afterwards).
    sharded:    whether several tasks can compute its shards side by side.
    key_config: extra facts its output depends on beyond the section (resolved model configs, ...).
    code_for:   project modules the *configured* stage runs that its imports do not name (the dataset
                adapter of the configured format): they join its code identity.
    per_method: one artifact per method of `train.methods`, each keyed by that method alone.
    preview:    cheap enough for `--dry-run` to compute into a scratch folder when it misses, so the plan
                of every stage downstream is exact (keys, hits, items to compute) rather than pending.
    shard_jobs: the stage's sharded tables (work and units, no processing): what `--dry-run` counts
                as "N of M items to compute, K reused" before anything runs.
    config_section: the experiment-file section its fields come from, when not its name.
    memo_excludes: key-config fields left out of the memo salt (`KeyParts.memo_salt`): each work
                unit's input digest holds its own share of them (describe: its view's prompt;
                translate: its language's model or file), or they only choose which units exist and
                how they are sharded (splits, shard sizes). Changing one then computes only the units
                it touches.
    """

    name: str
    upstream: tuple[str, ...]
    reads: Mapping[str, tuple[str, ...]]
    section: Callable[[ExperimentConfig], Section]
    run: Callable[[StageContext], None]
    sharded: bool = False
    key_config: Callable[[ExperimentConfig, Fingerprinter], dict[str, Any]] | None = None
    code_for: Callable[[ExperimentConfig], tuple[str, ...]] | None = None
    per_method: bool = False
    preview: bool = False
    shard_jobs: Callable[[StageContext], list[ShardJob]] | None = None
    config_section: str = ""
    memo_excludes: tuple[str, ...] = ()
    module: str = field(default="", compare=False)  # set from `run`

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise TypeError(f"StageDef.name must be an identifier, got {self.name!r}")
        if not isinstance(self.upstream, tuple) or not all(isinstance(up, str) for up in self.upstream):
            raise TypeError(f"stage {self.name}: upstream must be a tuple of stage names, got {self.upstream!r}")
        if set(self.reads) != set(self.upstream):
            raise TypeError(f"stage {self.name}: reads must name exactly its upstream stages {list(self.upstream)}, "
                            f"got {sorted(self.reads)}")
        for up, names in self.reads.items():
            if not isinstance(names, tuple) or not names or not all(isinstance(n, str) and n for n in names):
                raise TypeError(f"stage {self.name}: reads[{up!r}] must be a non-empty tuple of file names, "
                                f"folders ('x/') or {WHOLE!r}, got {names!r}")
        for name in ("section", "run"):
            if not callable(getattr(self, name)):
                raise TypeError(f"stage {self.name}: {name} must be callable")
        object.__setattr__(self, "config_section", self.config_section or self.name)
        object.__setattr__(self, "module", self.run.__module__)
