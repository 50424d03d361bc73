"""A change costs what it changes: reruns after small edits of a 1,000-image dataset.

    python benchmarks/bench_incremental.py                  # 1,000 images (+10 to add), tiny models, CPU
    python benchmarks/bench_incremental.py --images 200     # quicker

The demo's generator writes a larger collection of the same world; the first run takes 10 of its
training images out. Then, one after another, each followed by a rerun of the whole pipeline up to
train (in this process, no Prefect):

  (a) one English caption edited          describe and visual compute nothing; translate and features
                                          only the edited caption's rows; train retrains (new data)
  (b) the 10 images added back            describe and visual compute exactly 10 items
  (c) one image replaced                  describe and visual compute exactly 1 item
  (d) one leccr loss weight changed       only train[leccr] trains
  (e) one describe prompt view added      describe computes that view of every item, nothing else
      (`--set describe.image_views.colours=...`: the default views stay)
  (f) one target language added           translate translates that language only
  (g) one split added to describe.splits  describe describes that split's items only

The first run translates into de and fr and describes the train and val splits, so (f) and (g) have
something to add. For each rerun it prints the units each per-item stage computed (and reused), which jobs were
recomputed, and the wall time of the stages up to features, and of the whole rerun, as ratios of
the first run's.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image, ImageOps  # noqa: E402

UP_TO_FEATURES = ("dataset", "translate", "describe", "visual", "features")
PER_ITEM = ("translate", "describe", "visual", "features")


FIRST = {"dataset.languages": ["de", "fr"], "describe.splits": ["train", "val"]}


def _config(demo_models: Path, data: Path, artifacts: Path, epochs: int, overrides: dict):
    """configs/demo.yaml on this data, with `--set`-style overrides (as the CLI applies them)."""
    import yaml

    from leccr.config import apply_override, parse_config

    repo = Path(__file__).resolve().parents[1]
    text = (repo / "configs" / "demo.yaml").read_text().replace("artifacts/demo/models", str(demo_models))
    config = yaml.safe_load(text)
    config["artifacts_root"] = str(artifacts)
    config["dataset"]["path"] = str(data)
    config["train"].update(epochs=epochs, early_stopping_patience=None, val_split=None)
    for dotted, value in {"train.models.leccr.losses.w_d": 0.3, **FIRST, **overrides}.items():
        apply_override(config, dotted, value)
    return parse_config(config)


def _remove_train_items(data: Path, names: list[str]) -> None:
    """Take items out of the train split, in every file that lists them (line i describes image i)."""
    listing_file = data / "data" / "task1" / "image_splits" / "train.txt"
    listing = listing_file.read_text(encoding="utf-8").split("\n")[:-1]
    keep = [i for i, name in enumerate(listing) if name not in names]
    by_line = [data / "data" / "task1" / "image_splits" / "train.txt",
               data / "data" / "task2" / "image_splits" / "train_images.txt",
               data / "data" / "task1" / "raw" / "train.en",
               *sorted((data / "data" / "task2" / "raw").glob("train.*.en"))]
    for path in by_line:
        lines = path.read_text(encoding="utf-8").split("\n")[:-1]
        path.write_text("".join(f"{lines[i]}\n" for i in keep), encoding="utf-8")
    ids = {Path(name).stem for name in names}
    for path in sorted((data / "TextData").glob("Flickr30ktrain_*.caption.txt")):
        lines = path.read_text(encoding="utf-8").split("\n")[:-1]
        path.write_text("".join(f"{line}\n" for line in lines if line.split("#", 1)[0] not in ids), encoding="utf-8")
    for name in names:
        (data / "images" / name).unlink()


def _train_images(data: Path) -> list[str]:
    return (data / "data" / "task1" / "image_splits" / "train.txt").read_text(encoding="utf-8").split()


def _edit_caption(data: Path) -> None:
    path = data / "data" / "task1" / "raw" / "train.en"
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[0] = re.sub(r"^(\S+)", r"\1 small", lines[0])  # one word added
    path.write_text("\n".join(lines), encoding="utf-8")


def _replace_image(data: Path) -> None:
    image = data / "images" / _train_images(data)[0]
    ImageOps.mirror(Image.open(image).convert("RGB")).save(image)


def _run(cfg) -> tuple[dict, float, float]:
    from leccr.core.driver import run_pipeline

    started = time.perf_counter()
    outcomes = run_pipeline(cfg, ["train"])
    wall = time.perf_counter() - started
    head = sum(o.seconds for label, o in outcomes.items() if label in UP_TO_FEATURES)
    return outcomes, wall, head


def _computed(outcomes: dict) -> str:
    parts = []
    for stage in PER_ITEM:
        outcome = outcomes[stage]
        if outcome.cache_hit:
            parts.append(f"{stage} hit")
            continue
        reuse = outcome.artifact.manifest.summary.get("reuse", {})
        parts.append(f"{stage} " + ", ".join(f"{table}: {c['computed']} computed/{c['reused']} reused"
                                             for table, c in reuse.items()))
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="images in the first run (10 more are added in (b))")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs per method")
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep it (default: a temp folder)")
    args = parser.parse_args(argv)

    from leccr.cli.demo import prepare_demo
    from leccr.core.explain import explain
    from leccr.datasets.demo import generate_demo

    work = args.keep or Path(tempfile.mkdtemp(prefix="leccr-bench-incremental-"))
    work.mkdir(parents=True, exist_ok=True)
    demo = prepare_demo(work / "demo")  # the tiny models (and the small demo, for their tokenizer corpus)
    models = Path(demo["data"]).parent / "models"
    full = generate_demo(work / "full", num_images=args.images + 10, num_videos=0)
    data = work / "data"
    if data.exists():
        shutil.rmtree(data)
    shutil.copytree(full, data)
    added = _train_images(full)[-10:]
    _remove_train_items(data, added)
    artifacts = work / "artifacts"
    shutil.rmtree(artifacts, ignore_errors=True)

    print(f"dataset: {args.images} images ({len(_train_images(data))} train), tiny models, {args.epochs} epochs; "
          f"work folder {work}")
    outcomes, first_wall, first_head = _run(_config(models, data, artifacts, args.epochs, {}))
    print(f"first run: {first_wall:.1f} s (stages up to features {first_head:.1f} s)")
    rows = []

    def add_back() -> None:
        for name in added:
            shutil.copy2(full / "images" / name, data / "images" / name)
        _restore_train_items(full, data)

    colours = {"describe.image_views.colours": "Name the colours of every shape in the picture."}
    changes = [  # each change's overrides hold from then on
        ("(a) one caption edited", lambda: _edit_caption(data), {}),
        ("(b) 10 images added", add_back, {}),
        ("(c) one image replaced", lambda: _replace_image(data), {}),
        ("(d) one leccr loss weight", lambda: None, {"train.models.leccr.losses.w_d": 0.5}),
        ("(e) one prompt view added", lambda: None, colours),
        ("(f) one language added", lambda: None, {"dataset.languages": ["de", "fr", "zh"]}),
        ("(g) one split described", lambda: None, {"describe.splits": ["train", "val", "test"]}),
    ]
    overrides: dict = {}
    for name, change, more in changes:
        change()
        overrides.update(more)
        cfg = _config(models, data, artifacts, args.epochs, overrides)
        print(f"\n{name}: leccr run --dry-run says")
        for planned in explain(cfg, ["train"]):
            print("  " + planned.line())
        outcomes, wall, head = _run(cfg)
        recomputed = [label for label, o in outcomes.items() if not o.cache_hit]
        rows.append((name, _computed(outcomes), ", ".join(recomputed), head / first_head, wall / first_wall))
        print(f"\n{name}\n  computed: {rows[-1][1]}\n  recomputed jobs: {rows[-1][2] or 'none'}\n"
              f"  stages up to features: {rows[-1][3]:.3f}x the first run; whole rerun {rows[-1][4]:.3f}x")
    print("\n| change | stages up to features / first run | whole rerun / first run | recomputed jobs |")
    print("|---|---|---|---|")
    for name, _, recomputed, head_ratio, wall_ratio in rows:
        print(f"| {name} | {head_ratio:.3f} | {wall_ratio:.3f} | {recomputed} |")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _restore_train_items(full: Path, data: Path) -> None:
    """The added images' lines, back in every list and caption file (the full dataset's files as they are,
    apart from the caption that (a) edited)."""
    edited = (data / "data" / "task1" / "raw" / "train.en").read_text(encoding="utf-8").split("\n")[0]
    for relative in ["data/task1/image_splits/train.txt", "data/task2/image_splits/train_images.txt",
                     "data/task1/raw/train.en", *[p.relative_to(full).as_posix()
                                                  for p in sorted((full / "data" / "task2" / "raw").glob("train.*.en"))],
                     *[p.relative_to(full).as_posix() for p in sorted((full / "TextData").glob("Flickr30ktrain_*"))]]:
        shutil.copy2(full / relative, data / relative)
    _edit_first_line(data / "data" / "task1" / "raw" / "train.en", edited)


def _edit_first_line(path: Path, line: str) -> None:
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[0] = line
    path.write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
