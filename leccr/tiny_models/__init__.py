"""Tiny random-weight models for tests and the CPU demo, saved with `save_pretrained` so every stage
loads them with the same `from_pretrained(path)` code real users point at real weights.

`build_all(out_dir, corpus, seed)` builds `text_encoder/`, `vision/`, `mt/` and `llava/`: the same seed
and corpus give byte-identical weight files; a folder already complete for that seed and corpus is
reused; each is written to a temporary folder and renamed, so a crash never leaves half a model.

    leccr build-tiny-models --out models/ --corpus-file captions.txt --seed 0
"""

from __future__ import annotations

import argparse
from pathlib import Path


def build_all(out_dir: Path, corpus: list[str], seed: int = 0) -> dict[str, Path]:
    """Build (or reuse) the four tiny models under `out_dir`; returns {name: folder}.

    `corpus`: sentences in every language the tokenizers must cover (the dataset's captions).
    """
    if not corpus:
        raise ValueError("build_all: the corpus is empty; the tokenizers are trained on it")
    from leccr.tiny_models.mllm import build_tiny_llava  # the describe stage's tiny LLaVA (its owner's module)
    from leccr.tiny_models.mt import build_mt
    from leccr.tiny_models.text import build_text_encoder
    from leccr.tiny_models.vision import build_vision

    out_dir = Path(out_dir)
    return {
        "text_encoder": build_text_encoder(out_dir / "text_encoder", corpus, seed),
        "vision": build_vision(out_dir / "vision", seed),
        "mt": build_mt(out_dir / "mt", corpus, seed),
        "llava": build_tiny_llava(out_dir / "llava", corpus, seed),
    }


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The builder's options, shared by `main` and the `leccr build-tiny-models` subcommand."""
    parser.add_argument("--out", required=True, type=Path, help="folder to build the models into")
    parser.add_argument(
        "--corpus-file",
        required=True,
        type=Path,
        help="text file, one sentence per line: the tokenizers are trained on it",
    )
    parser.add_argument("--seed", type=int, default=0, help="weights seed (same seed and corpus: same bytes)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="leccr build-tiny-models", description=__doc__))
    return run(parser.parse_args(argv), parser)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    corpus = [line.strip() for line in args.corpus_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not corpus:
        parser.error(f"--corpus-file {args.corpus_file} has no non-empty line")
    for name, path in build_all(args.out, corpus, args.seed).items():
        print(f"{name:<13} {path}")
    return 0
