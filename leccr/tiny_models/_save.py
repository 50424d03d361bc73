"""Shared by the tiny-model builders: build into a temporary sibling folder, rename into place."""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path


def build_folder(out: Path, required: tuple[str, ...], kind: str, seed: int, corpus_lines: int,
                 write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` into a temporary folder and rename it to `out`; skip when `out` is complete.

    A crash mid-build leaves only a `.tmp-*` folder, never a half model at `out`.
    """
    out = Path(out)
    if all((out / name).is_file() for name in required):
        return out
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    missing = [name for name in required if not (tmp / name).is_file()]
    if missing:
        raise RuntimeError(f"building {kind} into {tmp} did not write {missing}")
    (tmp / "tiny_model.json").write_text(json.dumps({"kind": kind, "seed": seed, "corpus_lines": corpus_lines},
                                                    indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
