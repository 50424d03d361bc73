"""Shared by the tiny-model builders: build into a temporary sibling folder, rename into place.

Each finished folder holds `tiny_model.json`, the recipe it was built from (kind, builder version,
seed, a hash of the corpus). A complete folder with the same recipe is reused as is; one with another
recipe (a new seed, corpus or builder version) is rebuilt, so a folder never holds stale weights
under a name the caller thinks is fresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from leccr.core.io import give_default_mode

log = logging.getLogger(__name__)

RECIPE_FILE = "tiny_model.json"


def corpus_digest(corpus: list[str]) -> str:
    """sha256 of the corpus lines in sorted order: the builders' output does not depend on line order."""
    return hashlib.sha256("\n".join(sorted(corpus)).encode("utf-8")).hexdigest()


def recipe(kind: str, version: str, seed: int, corpus: list[str] | None) -> dict:
    """What a folder was built from; `corpus` is None for models without a tokenizer (the vision tower)."""
    return {
        "kind": kind,
        "builder_version": version,
        "seed": seed,
        "corpus_lines": None if corpus is None else len(corpus),
        "corpus_sha256": None if corpus is None else corpus_digest(corpus),
    }


def read_recipe(out: Path) -> dict | None:
    try:
        return json.loads((Path(out) / RECIPE_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def build_folder(out: Path, required: tuple[str, ...], want: dict, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` into a temporary folder and rename it to `out`; skip when `out` already holds `want`.

    A crash mid-build leaves only a `.<name>.tmp-<pid>` folder, never a half model at `out`.
    """
    out = Path(out)
    have = read_recipe(out)
    if have == want and all((out / name).is_file() for name in required):
        return out
    if out.exists() and have is None and any(out.iterdir()):
        raise FileExistsError(
            f"{out} exists and is not a tiny-model folder (no {RECIPE_FILE}); "
            f"refusing to overwrite it with a tiny {want['kind']} model"
        )
    if have is not None:
        log.info("rebuilding tiny %s in %s: built from %s, asked for %s", want["kind"], out, have, want)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        missing = [name for name in required if not (tmp / name).is_file()]
        if missing:
            raise RuntimeError(f"building tiny {want['kind']} into {tmp} did not write {missing}")
        (tmp / RECIPE_FILE).write_text(json.dumps(want, indent=2) + "\n", encoding="utf-8")
        for weights in tmp.rglob("*.safetensors"):
            give_default_mode(weights)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():  # an older recipe (checked above that it is ours)
        shutil.rmtree(out)
    try:
        os.replace(tmp, out)
    except OSError:
        # Another process building the same folder renamed its copy first: the same recipe gives the
        # same bytes, so keep theirs.
        shutil.rmtree(tmp, ignore_errors=True)
        if read_recipe(out) != want:
            raise
    return out
