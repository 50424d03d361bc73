"""The paper's model dimensions on this machine: visual, features and train at real size, float32 vs float16.

    python benchmarks/bench_real_dims.py                     # 240 demo images, 1 epoch, float32 and float16
    python benchmarks/bench_real_dims.py --items 120 --threads 1

No weights are downloaded: the models are built from the real architectures' full configs with random
weights, which cost what the real ones cost (the same shapes, the same FLOPs, the same bytes):

    vision   CLIPVisionModel with ViT-B/32's config (12 layers, width 768, patch 32), run at 384 px as
             configs/multi30k_de.yaml does (interpolated position embeddings): 145 tokens x 768 per image
    text     BertModel with mBERT's config (12 layers, width 768, vocabulary 119,547); the demo's
             tokenizer (the ids stay within the vocabulary). Descriptions are written long enough to
             fill `max_length` 200 tokens, as a 7B MLLM's four views do
    train    LECCR at the multi30k-de preset (4 slots, 3 slot layers, its loss weights) and the baseline,
             batch 128, one epoch, the text encoder fine-tuned

The data is the demo generator's (N images, 60/20/20 splits, German MT captions). Every stage runs in
its own process (benchmarks/bench_scale.py's machinery: wall and CPU seconds, peak RSS, anonymous RSS,
bytes written). The run is repeated with `features.visual_dtype` and `features.states_dtype` float16.
Then float16 storage is compared with float32 on the same trained model: the largest difference of a
stored value, and of the test split's fused scores, and the test R@K of both.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scale import GIB, new_bytes, run_child  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VIEW_WORDS = 60  # words per description view: 4 views joined fill max_length 200 with the demo's tokenizer


# ------------------------------------------------------------------------------- models
def build_vision(out: Path) -> Path:
    """CLIP ViT-B/32's vision tower (openai/clip-vit-base-patch32's config) with random weights."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    if (out / "config.json").is_file():
        return out
    config = CLIPVisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=32,
        projection_dim=512,
        hidden_act="quick_gelu",
    )
    torch.manual_seed(0)
    CLIPVisionModel(config).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(out)
    return out


def build_text(out: Path, tokenizer_from: Path) -> Path:
    """mBERT's architecture (bert-base-multilingual-cased's config) with random weights; the demo's tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    if (out / "config.json").is_file():
        return out
    config = BertConfig(
        vocab_size=119_547,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=512,
        type_vocab_size=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tokenizer_from / name, out / name)
    return out


def long_descriptions(seed_file: Path, out: Path) -> Path:
    """The demo's scene descriptions, each view repeated to VIEW_WORDS words (a 7B MLLM writes long ones)."""
    data = json.loads(seed_file.read_text(encoding="utf-8"))
    for views in data["descriptions"].values():
        for view, text in views.items():
            words = text.split()
            views[view] = " ".join((words * (VIEW_WORDS // len(words) + 1))[:VIEW_WORDS])
    data["model"] += f", each view repeated to {VIEW_WORDS} words"
    out.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return out


# ------------------------------------------------------------------------------- config
def real_config(
    data: Path,
    descriptions: Path,
    vision: Path,
    text: Path,
    artifacts: Path,
    dtype: str,
    threads: int | None,
    device: str = "cpu",
) -> dict:
    """configs/multi30k_de.yaml on the demo folder: its features and train sections, the LECCR preset."""
    import yaml

    config = yaml.safe_load((REPO / "configs" / "multi30k_de.yaml").read_text())
    config["name"] = f"real-dims-{dtype}"
    config["artifacts_root"] = str(artifacts)
    config["dataset"] = {"format": "multi30k", "path": str(data), "languages": ["de"], "options": {}}
    config["translate"] = {"engine": "import", "splits": ["train", "val"]}
    config["describe"] = {"engine": "import", "import_path": str(descriptions)}
    config["features"].update(
        vision_model=str(vision),
        text_model=str(text),
        visual_dtype=dtype,
        states_dtype=dtype,
        shard_size=64,
        device=device,
    )
    config["train"].update(epochs=1, early_stopping_patience=None, preset="multi30k-de", device=device)
    if threads is not None:
        config["train"]["threads"] = threads
    config.pop("evaluate", None)  # NRCCR's published row is for Multi30K, not the demo's data
    return config


# ------------------------------------------------------------------------------- float16 vs float32
def storage_error(features32: Path, features16: Path) -> dict:
    """Largest absolute and relative difference between the float32 and float16 copies of the same values."""
    import numpy as np

    from leccr.data import FeatureTables

    a, b = FeatureTables.open(features32), FeatureTables.open(features16)
    out = {}
    for name, left, right in (("visual", a.visual_values, b.visual_values), ("states", a.desc_states, b.desc_states)):
        worst_abs, worst_rel, largest = 0.0, 0.0, 0.0
        for row in range(len(left)):
            x = np.asarray(left[row], dtype=np.float32)
            y = np.asarray(right[row], dtype=np.float32)
            diff = np.abs(x - y)
            worst_abs = max(worst_abs, float(diff.max()))
            worst_rel = max(worst_rel, float((diff / np.maximum(np.abs(x), 1e-3)).max()))
            largest = max(largest, float(np.abs(x).max()))
        out[name] = {"max_abs": worst_abs, "max_rel": worst_rel, "largest_value": largest}
    return out


def scores_on(features: Path, method_dir: Path) -> dict:
    """Per language: the test split's fused score matrix, the index of each caption's item, and the
    retrieval metrics, with one trained model."""
    import torch

    from leccr.data import FeatureTables, load_eval_captions, load_eval_items, query_caption_kind
    from leccr.evaluation.metrics import chunked_retrieval_metrics, matrix_score_block
    from leccr.evaluation.scoring import load_model
    from leccr.models.encode import encode_items, encode_texts

    tables = FeatureTables.open(features)
    model = load_model(method_dir).eval()
    items = load_eval_items(tables, "test")
    visual_global, visual_slots = encode_items(model, items, 64, "cpu")
    alpha = float(model.config.score_alpha) if visual_slots is not None else 1.0
    results = {}
    for lang in ("en", "de"):
        captions = load_eval_captions(tables, lang, items, "test", kind=query_caption_kind(tables, lang, "test"))
        text = encode_texts(model, captions.ids, captions.mask, 64, "cpu")
        with torch.no_grad():
            matrix = model.score(text, visual_global, visual_slots, alpha)
        metrics = chunked_retrieval_metrics(matrix_score_block(matrix), captions.item_index, len(items.item_ids))
        results[lang] = (matrix, captions.item_index, {k: float(v) for k, v in metrics.items()})
    return results


def compare_scores(features32: Path, features16: Path, method_dir: Path) -> dict:
    left, right = scores_on(features32, method_dir), scores_on(features16, method_dir)
    import torch

    def target_ranks(matrix: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The rank of each caption's own item (1 = first)."""
        own = matrix.gather(1, target[:, None])
        return (matrix > own).sum(dim=1) + 1

    out = {}
    for lang in left:
        (m32, target, r32), (m16, _, r16) = left[lang], right[lang]

        top32 = torch.argsort(-m32, dim=1, stable=True)[:, :10]
        top16 = torch.argsort(-m16, dim=1, stable=True)[:, :10]
        out[lang] = {
            "max_abs_score_diff": float((m32 - m16).abs().max()),
            "score_range": float(m32.max() - m32.min()),
            "queries": len(m32),
            "same_top10": int((top32 == top16).all(dim=1).sum()),
            "same_target_rank": int((target_ranks(m32, target) == target_ranks(m16, target)).sum()),
            "metrics_float32": r32,
            "metrics_float16": r16,
        }
    return out


def print_scores(scores: dict) -> None:
    for lang, s in scores.items():
        print(
            f"  test {lang}: fused scores max |diff| {s['max_abs_score_diff']:.2e} (of a range of "
            f"{s['score_range']:.3f}); of {s['queries']} queries, {s['same_target_rank']} rank their own item "
            f"the same and {s['same_top10']} have the same top 10; SumR {s['metrics_float32']['sumr']:.2f} "
            f"(float32 features) vs {s['metrics_float16']['sumr']:.2f} (float16)"
        )


def print_comparison(work: Path) -> int:
    """The float16 / float32 comparison of an earlier run's artifacts (either dtype's trained LECCR)."""
    features32, features16 = (
        next(p.parent for p in (work / f"artifacts-{d}" / "features").glob("*/features_info.json"))
        for d in ("float32", "float16")
    )
    method_dir = next(
        path for dtype in ("float32", "float16") for path in (work / f"artifacts-{dtype}" / "train").glob("*/leccr")
    )
    print(f"float16 storage against float32, scored with {method_dir}:")
    print_scores(compare_scores(features32, features16, method_dir))
    return 0


# ------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=240, help="demo images (60/20/20 train/val/test)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of every stage (see bench_scale)")
    parser.add_argument("--work", type=Path, default=None, help="work here and keep it (default: a temp folder)")
    parser.add_argument(
        "--compare-only",
        action="store_true",
        help="with --work of an earlier run: only compare its float16 and float32 artifacts again",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="where visual, features and train run (cuda on a GPU machine: bf16 there, precision auto)",
    )
    args = parser.parse_args(argv)
    if args.compare_only:
        return print_comparison(args.work)

    from leccr.cli.demo import prepare_demo
    from leccr.datasets.demo import generate_demo, write_scene_descriptions

    work = args.work or Path(tempfile.mkdtemp(prefix="leccr-bench-real-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    demo = prepare_demo(work / "demo")
    vision = build_vision(work / "models" / "clip-vit-b32-random")
    text = build_text(work / "models" / "mbert-random", Path(demo["text_encoder"]))
    data = generate_demo(work / f"data-{args.items}", num_images=args.items, num_videos=0)
    descriptions = long_descriptions(
        write_scene_descriptions(work / f"scene-{args.items}.json", num_images=args.items, num_videos=0),
        work / f"long-{args.items}.json",
    )
    print(
        f"bench_real_dims: {args.items} images, models built in {work / 'models'} "
        f"({time.perf_counter() - started:.0f} s so far)",
        flush=True,
    )

    rows, paths = [], {}
    for dtype in ("float32", "float16"):
        artifacts = work / f"artifacts-{dtype}"
        shutil.rmtree(artifacts, ignore_errors=True)
        config_file = work / f"config-{dtype}.json"
        config_file.write_text(
            json.dumps(real_config(data, descriptions, vision, text, artifacts, dtype, args.threads, args.device))
        )
        seen: set = set()
        for label in ("dataset", "translate", "describe", "visual", "features", "train[baseline]", "train[leccr]"):
            figures = run_child(config_file, label, work / f"log-{dtype}.txt", args.threads)
            fresh, _, cache = new_bytes(Path(figures["path"]), seen)
            if label.startswith("train["):
                _, _, cache = new_bytes(Path(figures["path"]).parents[1] / "features", seen)
                info = json.loads((Path(figures["path"]) / label[6:-1] / "train_info.json").read_text())
                units, unit = info["steps"] * info["batch_size"], "pairs"  # the last, incomplete batch is dropped
            else:
                units, unit = args.items, "items"
            paths[(dtype, label)] = Path(figures["path"])
            row = {
                "dtype": dtype,
                "stage": label,
                "seconds": figures["seconds"],
                "cpu": figures["cpu"],
                "load": figures["load"],
                "units": units,
                "unit": unit,
                "rss": figures["tree_rss"],
                "anon": figures["anon"],
                "written": fresh,
                "cache": cache,
                "summary": figures["summary"],
            }
            rows.append(row)
            print(
                f"  {dtype} {label:<16} {row['seconds']:8.1f} s  CPU {row['cpu']:8.1f} s  "
                f"{row['seconds'] / units:8.3f} s/{unit[:-1]}  RSS {row['rss'] / GIB:5.2f} GiB "
                f"(anon {row['anon'] / GIB:5.2f})  written {fresh / 2**20:8.1f} MiB  load {row['load']:.1f}",
                flush=True,
            )

    features32, features16 = paths[("float32", "features")], paths[("float16", "features")]
    sub_tables = {}
    for dtype, features in (("float32", features32), ("float16", features16)):
        sub_tables[dtype] = {
            sub: sum(p.stat().st_size for p in (features / sub).glob("part-*.parquet"))
            for sub in ("visual", "text", "descriptions")
        }
    error = storage_error(features32, features16)
    scores = compare_scores(features32, features16, paths[("float32", "train[leccr]")] / "leccr")
    result = {"items": args.items, "rows": rows, "bytes": sub_tables, "storage_error": error, "scores": scores}
    (work / "bench_real_dims.json").write_text(json.dumps(result, indent=1))

    print(f"\nwhole benchmark: {time.perf_counter() - started:.0f} s")
    print(
        f"\n{'dtype':<8} {'stage':<16} {'wall s':>8} {'CPU s':>8} {'load':>5} {'s/unit':>8} {'unit':<6} "
        f"{'peak RSS':>9} {'anon':>7} {'written':>10} {'B/unit':>10} {'cache':>9}"
    )
    for r in rows:
        print(
            f"{r['dtype']:<8} {r['stage']:<16} {r['seconds']:8.1f} {r['cpu']:8.1f} {r['load']:5.1f} "
            f"{r['seconds'] / r['units']:8.3f} {r['unit']:<6} {r['rss'] / GIB:7.2f} G {r['anon'] / GIB:5.2f} G "
            f"{r['written'] / 2**20:8.1f} M {r['written'] / r['units']:10.0f} {r['cache'] / 2**20:7.1f} M"
        )
    print("\nbytes per item on disk (Parquet parts):")
    for sub in ("visual", "text", "descriptions"):
        b32, b16 = sub_tables["float32"][sub] / args.items, sub_tables["float16"][sub] / args.items
        print(f"  {sub:<13} float32 {b32:10.0f}  float16 {b16:10.0f}  (x{b16 / b32:.2f})")
    print("\nfloat16 storage against float32:")
    for name, e in error.items():
        print(
            f"  {name:<7} max |diff| {e['max_abs']:.2e}, max relative diff {e['max_rel']:.2e} "
            f"(largest |value| {e['largest_value']:.1f})"
        )
    print_scores(scores)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
