"""`leccr demo`: the generated demo world and tiny models, then every stage on them."""
from __future__ import annotations

import argparse
from pathlib import Path

from leccr.cli.common import PREFECT_HELP, Commands
from leccr.cli.run import cmd_run


# `leccr demo` runs the demo with the generator's scene descriptions (what a capable MLLM would say);
# the tiny random-weight LLaVA still describes every item first, through the real describe engine.
DEMO_CONFIG = "configs/demo_scene.yaml"


LLAVA_DEMO_CONFIG = "configs/demo.yaml"


DEMO_ROOT = Path("artifacts/demo")  # demo data and tiny models, referenced by configs/demo.yaml


def prepare_demo(root: Path = DEMO_ROOT, seed: int = 0) -> dict[str, Path]:
    """Generate the demo dataset, its scene descriptions and the tiny models (each skipped when already
    complete)."""
    from leccr.datasets.demo import (SCENE_DESCRIPTIONS_FILE, SHUFFLED_DESCRIPTIONS_FILE, demo_corpus, generate_demo,
                                     write_scene_descriptions)
    from leccr.tiny_models import build_all

    data = generate_demo(root / "data", seed=seed)
    # Beside the data, not in it: the dataset's content (and every key built on it) stays the same.
    scene = write_scene_descriptions(root / SCENE_DESCRIPTIONS_FILE, seed=seed)
    shuffled = write_scene_descriptions(root / SHUFFLED_DESCRIPTIONS_FILE, seed=seed, shuffled=True)
    models = build_all(root / "models", demo_corpus(data), seed=seed)
    return {"data": data, "scene_descriptions": scene, "shuffled_descriptions": shuffled, **models}


def cmd_demo(args: argparse.Namespace) -> int:
    from leccr.config import load_config

    prepared = prepare_demo(Path(args.root))
    print("Demo inputs ready:", ", ".join(f"{k}={v}" for k, v in prepared.items()))
    cfg = load_config(args.config)
    if cfg.describe.engine == "import":
        # The run imports its descriptions; the MLLM path (engine, prompts, frames) must still run.
        print(f"\nThe tiny random-weight LLaVA describes every item ({LLAVA_DEMO_CONFIG}, stage describe): "
              "the real describe engine, whose text is noise; the run after it imports its descriptions.")
        status = cmd_run(argparse.Namespace(config=LLAVA_DEMO_CONFIG, stage=["describe"],
                                            force=[s for s in args.force if s in ("dataset", "describe")], set=[],
                                            runner=None, ray_address=None, dry_run=False, prefect=args.prefect,
                                            verbose=args.verbose))
        if status != 0:
            return status
        print()
    status = cmd_run(argparse.Namespace(config=args.config, stage=[], force=args.force, set=[], runner=None,
                                        ray_address=None, dry_run=False, prefect=args.prefect,
                                        verbose=args.verbose))
    if status == 0:
        print(f"\nDescriptions in {cfg.name}: {describe_source(cfg)}")
        print_search_commands(args.config)
    return status


def describe_source(cfg) -> str:
    """What wrote the experiment's descriptions: the import file's own "model" (the demo's says "scene
    descriptions from the demo generator (standing in for an MLLM)"), else the engine and model."""
    if cfg.describe.engine == "import":
        from leccr.engines.mllm import load_imported_descriptions

        return load_imported_descriptions(cfg.describe.import_path, cfg.describe.import_view).model \
            or f"imported from {Path(cfg.describe.import_path).name}"
    return f"{cfg.describe.engine} · {Path(cfg.describe.model).name}"


def print_search_commands(config: str) -> None:
    """Ready `leccr search` / `leccr serve` lines for the collection the config indexed (a German caption
    of its first item as the query)."""
    from leccr.config import load_config
    from leccr.search import find_index
    from leccr.schemas.core import read_table
    from leccr.schemas.index import INDEX_ITEMS

    cfg = load_config(config)
    index = find_index(cfg.artifacts_root, cfg.name)
    captions = read_table(index.file("items.parquet"), INDEX_ITEMS, columns=["captions"]).column("captions")
    query, lang = next(((c["text"], c["lang"]) for item in captions.to_pylist() for c in item if c["lang"] == "de"),
                       ("a red circle", "en"))
    root = "" if cfg.artifacts_root == "artifacts" else f" --root {cfg.artifacts_root}"
    print(f"\nSearch the collection:\n  leccr search \"{query}\" --lang {lang} --method leccr -k 5{root}\n"
          f"  leccr serve{root}          # then open http://127.0.0.1:8000/")


def add_commands(commands: Commands) -> None:
    stage_list = ", ".join(commands.stages)
    demo = commands.add("demo", "build demo data and tiny models, then run every stage on them (with the demo "
                           "generator's scene descriptions; the tiny LLaVA describes too)")
    demo.add_argument("--root", default=str(DEMO_ROOT),
                      help="folder for the generated demo data and tiny models (default: %(default)s; "
                           "the default config reads them there)")
    demo.add_argument("--config", default=DEMO_CONFIG, help="experiment YAML to run (default: %(default)s)")
    demo.add_argument("--force", action="append", default=[], metavar="STAGE",
                      help=f"recompute this stage and everything downstream; repeatable. Stages: {stage_list}")
    demo.add_argument("--prefect", action="store_true", help=PREFECT_HELP)
    demo.set_defaults(handler=cmd_demo)
