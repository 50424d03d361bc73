"""`leccr datasets check PATH --format F`: validate a dataset folder and say what is in it.

Prints items per split (by media type), captions per split and language (by kind), and every
problem as `file:line: message`; returns 0 when the folder is clean, 1 otherwise. Never a traceback:
a bad folder, an unknown format or a bad option is reported as a message.
"""

from __future__ import annotations

from pathlib import Path

from leccr.datasets.base import DatasetOptionsError, get_adapter

MAX_PROBLEMS_SHOWN = 200  # a broken 30k-line file should not flood the terminal; the total is printed


def check_command(path: Path, fmt: str, options: dict | None = None) -> int:
    try:
        adapter = get_adapter(fmt)
        tables, problems = adapter.check(Path(path), options or {}, None)
    except DatasetOptionsError as error:
        print(f"error: {error}")
        return 1
    except OSError as error:  # unreadable folder, permission denied: still a message, not a traceback
        print(f"error: cannot read {path}: {error}")
        return 1
    print(f"{fmt} dataset at {Path(path).absolute()}")
    items = tables.items_per_split()
    captions = tables.captions_per_split()
    if items:
        print("\nitems per split:")
        for split in _ordered(items):
            media = ", ".join(
                f"{count} {kind}{'s' if count != 1 else ''}" for kind, count in sorted(items[split].items())
            )
            print(f"  {split:<10} {media}")
    if captions:
        print("\ncaptions per split and language:")
        for split in _ordered(captions):
            for lang in sorted(captions[split], key=lambda lang: (lang != "en", lang)):
                kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(captions[split][lang].items()))
                print(f"  {split:<10} {lang:<3} {kinds}")
    missing = [p for p in problems if "missing" in p.message]
    malformed = [p for p in problems if p not in missing]
    for title, group in (("missing files", missing), ("problems", malformed)):
        if group:
            print(f"\n{title} ({len(group)}):")
            for problem in group[:MAX_PROBLEMS_SHOWN]:
                print(f"  {problem}")
            if len(group) > MAX_PROBLEMS_SHOWN:
                print(f"  ... and {len(group) - MAX_PROBLEMS_SHOWN} more")
    print(f"\n{'OK' if not problems else f'{len(problems)} problem(s) found'}")
    return 0 if not problems else 1


def _ordered(splits: dict) -> list[str]:
    order = {"train": 0, "val": 1, "test": 2}
    return sorted(splits, key=lambda s: (order.get(s, 3), s))
