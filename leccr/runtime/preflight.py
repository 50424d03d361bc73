"""What must hold before a run starts, checked before Prefect starts: each failure is one message
with the path and what to do, not a traceback from deep inside a stage.

    check_environment(cfg)   artifacts root (creatable, writable, not full), dataset path (a folder)
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

from leccr.config import ExperimentConfig

PROBE_BYTES = 2**20  # written and removed under the artifacts root: a full disk fails here, not mid-stage


class EnvironmentProblem(RuntimeError):
    """The machine, not the config, stops the run: a path that cannot be used. The message has a hint."""


def check_environment(cfg: ExperimentConfig, write: bool = True) -> None:
    """Raise `EnvironmentProblem` for the first unusable path; `write=False` (a dry run) skips the root."""
    if write:
        check_artifacts_root(Path(cfg.artifacts_root))
    check_dataset_path(Path(cfg.dataset.path), cfg.dataset.format)


def check_artifacts_root(root: Path) -> None:
    """The root exists (or can be created), is a folder, and takes a 1 MiB file."""
    hint = "set another with --set artifacts_root=DIR (or artifacts_root: in the config)"
    if root.exists() and not root.is_dir():
        raise EnvironmentProblem(f"artifacts root {root.absolute()} is a file, not a folder: {hint}")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise EnvironmentProblem(f"cannot create the artifacts root {root.absolute()}: {_reason(error)}; "
                                 f"{hint}") from None
    probe = root / f".leccr-write-probe-{os.getpid()}"
    try:
        _write_probe(probe)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise EnvironmentProblem(f"the disk of the artifacts root {root.absolute()} is full: free some space "
                                     f"(`leccr gc`, old runs) or {hint}") from None
        raise EnvironmentProblem(f"the artifacts root {root.absolute()} is not writable: {_reason(error)}; "
                                 f"fix its permissions or {hint}") from None
    finally:
        probe.unlink(missing_ok=True)


def _write_probe(path: Path) -> None:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"\0" * PROBE_BYTES)
        os.fsync(fd)
    finally:
        os.close(fd)


def check_dataset_path(path: Path, fmt: str) -> None:
    hint = "set dataset.path to the dataset's root folder (`leccr datasets check PATH --format F` validates one)"
    if not path.exists():
        raise EnvironmentProblem(f"dataset.path {path.absolute()} does not exist: {hint}")
    if not path.is_dir():
        raise EnvironmentProblem(f"dataset.path {path.absolute()} is a file, not a folder: the {fmt} layout is a "
                                 f"folder; {hint}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise EnvironmentProblem(f"dataset.path {path.absolute()} is not readable: fix its permissions")


def _reason(error: OSError) -> str:
    return error.strerror or type(error).__name__
