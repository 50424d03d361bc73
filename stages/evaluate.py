"""evaluate: recall both ways per language, SumR, mean/median rank, and a report people can read.

For every trained method of the train artifact (and, if configured, a zero-shot encoder pair) and
every language of the split:

1. encode every test caption of that language and every test visual item once, in batches;
2. score texts against items block by block (`chunk_size` x `chunk_size`), never holding the whole
   N_t x N_v matrix: for the fused score a first pass finds the global min/max of the global and slot
   matrices (its minmax is over the *whole* test matrix, METHOD.md quirk 3); `leccr.evaluation.metrics`
   then ranks block by block (each query's target score, then what comes before it);
3. write R@K both ways, SumR, mean and median rank for the fused score and the global-only score,
   recall@K curves, and the worst-ranked queries with their top retrieved items (chunked top-k).

Ranks follow `leccr.evaluation.metrics`: 1-based, in the order of a stable descending sort (ties go to the lower
index, as the reference's argsort). A visual item is found when any of its captions ranks within K.

Outputs: metrics.parquet and worst_queries.parquet (schemas/evaluate.py), report.md and plots/*.png
(leccr/evaluation/report.py); the report text is also `ctx.summary["report_markdown"]` for the flow to publish.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from leccr.config import EvaluateConfig, ExperimentConfig, Section, method_sort_key
from leccr.core.fingerprint import Fingerprinter
from leccr.runtime.hub import model_path
from leccr.core.context import StageContext
from leccr.core.stage import StageDef
from leccr.evaluation.scoring import (LanguageTexts, SplitData, encode_trained, encode_zero_shot, load_model, load_split,
                              make_score_block)
from leccr.schemas.evaluate import METRICS, WORST_QUERIES

if TYPE_CHECKING:  # torch is imported where it is used: planning a run never loads it
    import torch

    from leccr.evaluation.metrics import ScoreBlock

DIRECTIONS = ("text_to_visual", "visual_to_text")


def section(cfg: ExperimentConfig) -> Section:
    return cfg.evaluate


# ===================================================================================== the stage
@dataclass
class Evaluated:
    metrics: list[dict] = field(default_factory=list)
    worst: list[dict] = field(default_factory=list)
    curves: dict[tuple[str, str, str, str], np.ndarray] = field(default_factory=dict)


def evaluate_embeddings(result: Evaluated, method: str, checkpoint: str, data: SplitData, cfg: EvaluateConfig,
                        texts: dict[str, torch.Tensor], visual_global: torch.Tensor,
                        visual_slots: torch.Tensor | None, scores: dict[str, float],
                        device: torch.device | str = "cpu", details: bool = True) -> None:
    """Metrics, curves and worst queries of one method for every language and score variant.

    Embeddings are kept on the CPU between methods; the blocks are scored on `device`. `details`
    False: metrics only (the evaluate.alphas rows: no curves, no worst queries)."""
    from leccr.evaluation.metrics import chunked_ranks, recall_metrics

    n_items = len(data.item_ids)
    for lang, language in data.languages.items():
        for score_name, alpha in scores.items():
            # Global-only rows are written even when the fused score is global (alpha 1), so that
            # `WHERE score = 'global'` compares every method; their curves and worst queries are not repeated.
            duplicate = score_name == "global" and scores.get("fused") == 1.0
            block = make_score_block(texts[lang].to(device), visual_global.to(device),
                                     visual_slots.to(device) if visual_slots is not None else None, alpha,
                                     cfg.chunk_size)
            t2v, v2t = chunked_ranks(block, language.item_index, n_items, cfg.chunk_size, cfg.chunk_size, device)
            ranks = {"text_to_visual": t2v, "visual_to_text": v2t}
            stats = recall_metrics(t2v, v2t, cfg.ks)
            common = {"method": method, "score": score_name, "lang": lang, "split": cfg.split,
                      "n_texts": len(language.caption_ids), "n_items": n_items, "alpha": float(alpha),
                      "checkpoint": checkpoint}
            for direction, direction_ranks in ranks.items():
                for k in cfg.ks:
                    result.metrics.append({**common, "direction": direction, "metric": "recall", "k": k,
                                           "value": stats[f"{direction}_R@{k}"], "name": f"{lang}/{direction}_R@{k}"})
                for metric in ("mean_rank", "median_rank"):
                    result.metrics.append({**common, "direction": direction, "metric": metric, "k": None,
                                           "value": stats[f"{direction}_{metric}"],
                                           "name": f"{lang}/{direction}_{metric}"})
                if duplicate or not details:
                    continue  # the same numbers as the fused score: one curve, one error list
                valid = direction_ranks[direction_ranks > 0]
                ranked = n_items if direction == "text_to_visual" else len(language.caption_ids)
                result.curves[(method, score_name, lang, direction)] = np.array(
                    [(valid <= k).mean() * 100.0 for k in range(1, min(cfg.curve_max_k, ranked) + 1)])
                result.worst += _worst(block, direction, direction_ranks, language, data, cfg, common, device)
            result.metrics.append({**common, "direction": "both", "metric": "sumr", "k": None,
                                   "value": stats["sumr"], "name": f"{lang}/sumr"})


def _worst(block: ScoreBlock, direction: str, ranks: np.ndarray, language: LanguageTexts, data: SplitData,
           cfg: EvaluateConfig, common: dict, device: torch.device | str) -> list[dict]:
    from leccr.evaluation.metrics import topk_items, topk_texts

    if cfg.worst_queries == 0:
        return []
    candidates = np.nonzero(ranks > 0)[0]
    # Worst first; among equal ranks, the first query (stable order) — deterministic output.
    order = candidates[np.argsort(-ranks[candidates], kind="stable")][: cfg.worst_queries]
    if len(order) == 0:
        return []
    top = topk_items if direction == "text_to_visual" else topk_texts
    queries = {"texts" if direction == "text_to_visual" else "items": order.tolist()}
    values, index = top(block, len(language.caption_ids), len(data.item_ids), cfg.top_retrieved, cfg.chunk_size,
                        cfg.chunk_size, device, **queries)
    index, values = index.numpy(), values.numpy()
    rows = []
    captions_of: dict[int, list[str]] = {}
    for position, item in enumerate(language.item_index.tolist()):
        captions_of.setdefault(item, []).append(language.caption_ids[position])
    for query, found, found_scores in zip(order.tolist(), index, values):
        if direction == "text_to_visual":
            query_id, query_text = language.caption_ids[query], language.texts[query]
            expected = [data.item_ids[language.item_index[query]]]
            retrieved_ids = [data.item_ids[i] for i in found]
            retrieved_texts = [data.desc_texts[i] or "(no description)" for i in found]
        else:
            query_id, query_text = data.item_ids[query], data.desc_texts[query] or "(no description)"
            expected = captions_of.get(query, [])
            retrieved_ids = [language.caption_ids[i] for i in found]
            retrieved_texts = [language.texts[i] for i in found]
        rows.append({**{k: common[k] for k in ("method", "score", "lang")}, "direction": direction,
                     "query_id": query_id, "query_text": query_text, "rank": int(ranks[query]),
                     "expected": expected, "retrieved_ids": retrieved_ids, "retrieved_texts": retrieved_texts,
                     "retrieved_scores": [float(v) for v in found_scores]})
    return rows


def add_published(ctx: StageContext, cfg: EvaluateConfig, metrics: list[dict], languages: list[str],
                  report: str) -> str:
    """report.md with the "Published numbers" section (leccr.evaluation.published): the rows of evaluate.published
    for the dataset's format and the evaluated languages, beside our fused SumR."""
    from leccr.core.io import atomic_write_text
    from leccr.evaluation.published import matching, published_markdown

    dataset_format = ctx.inputs["dataset"].manifest.config.get("format")
    rows = matching(cfg.published, dataset_format, languages)
    ours = {(r["method"], r["lang"]): r["value"] for r in metrics if r["metric"] == "sumr" and r["score"] == "fused"}
    report = report.rstrip() + "\n\n" + "\n".join(published_markdown(rows, bool(cfg.published), ours))
    atomic_write_text(ctx.out_dir / "report.md", report)
    return report


def description_sources(ctx: StageContext) -> str:
    """Where the descriptions came from, as describe recorded it: "engine model" for each distinct pair
    (an imported file may name what wrote it, e.g. the demo generator's scene descriptions)."""
    import pyarrow.parquet as pq

    sources: set[str] = set()
    for part in ctx.inputs["describe"].parts():
        table = pq.read_table(part, columns=["engine", "model"])
        sources |= {" · ".join(filter(None, pair)) for pair in
                    zip(table.column("engine").to_pylist(), table.column("model").to_pylist())}
    return "; ".join(sorted(sources)) or "none"


def _load_history(method_dir: Path) -> pa.Table | None:
    import pyarrow.parquet as pq

    from leccr.schemas.train import check_history

    path = method_dir / "history.parquet"
    return check_history(pq.read_table(path), str(path)) if path.is_file() else None


def run(ctx: StageContext) -> None:
    cfg: EvaluateConfig = ctx.section  # type: ignore[assignment]
    from leccr.runtime.device import resolve_device
    from leccr.evaluation.metrics import chance_sumr
    from leccr.evaluation.report import sumr_console_table, write_report

    started = time.perf_counter()
    device = resolve_device(cfg.device)
    data = load_split(ctx, cfg)
    ctx.log.info("evaluate: %s, languages %s", data.coverage,
                 {lang: len(t.caption_ids) for lang, t in data.languages.items()})
    result = Evaluated()
    histories: dict[str, pa.Table] = {}
    train = ctx.inputs["train"]
    methods = sorted(train.methods, key=method_sort_key) if cfg.trained else []
    for method in methods:
        method_dir = train.method_dir(method)
        model = load_model(method_dir)
        alpha = cfg.alpha if cfg.alpha is not None else float(model.config.score_alpha)
        texts, visual_global, visual_slots = encode_trained(model, data, cfg.batch_size, device)
        if visual_slots is None:
            alpha = 1.0  # no slots (baseline, cl2cm, leccr with slots ablated): the fused score is global
        checkpoint = train.by_method[method].key
        evaluate_embeddings(result, method, checkpoint, data, cfg, texts, visual_global, visual_slots,
                            {"fused": alpha, "global": 1.0}, device)
        if cfg.alphas and visual_slots is None:
            ctx.log.info("evaluate: %s has no slots: evaluate.alphas does not apply (its score is global)", method)
        elif cfg.alphas:
            for weight in cfg.alphas:  # the same embeddings, one more ranking per weight
                evaluate_embeddings(result, method, checkpoint, data, cfg, texts, visual_global, visual_slots,
                                    {"alpha": weight}, device, details=False)
        history = _load_history(method_dir)
        if history is not None:
            histories[method] = history
        del model
    if cfg.zero_shot is not None:
        zs = cfg.zero_shot
        fingerprints = Fingerprinter()
        checkpoint = ("zs-" + fingerprints.path(model_path(zs.text_model))[:8] + "-"
                      + fingerprints.path(model_path(zs.vision_model))[:8])
        texts, visual_emb = encode_zero_shot(zs, data, cfg.batch_size, device)
        evaluate_embeddings(result, zs.name, checkpoint, data, cfg, texts, visual_emb, None, {"global": 1.0}, device)

    metrics = pa.Table.from_pylist(result.metrics, schema=METRICS)
    worst = pa.Table.from_pylist(result.worst, schema=WORST_QUERIES)
    ctx.write("metrics.parquet", metrics, METRICS)
    ctx.write("worst_queries.parquet", worst, WORST_QUERIES)
    header = {"split": f"{cfg.split} ({data.coverage})",
              "descriptions": description_sources(ctx),
              "train artifact": train.key, "features artifact": ctx.inputs["features"].key,
              "evaluate key": ctx.key,
              "chance SumR (a random ranking)": ", ".join(
                  f"{lang} {chance_sumr(t.item_index, len(data.item_ids), cfg.ks):.1f}"
                  for lang, t in data.languages.items())}
    report = write_report(ctx.out_dir, metrics, worst, result.curves, histories, header)
    report = add_published(ctx, cfg, result.metrics, list(data.languages), report)
    sumr = {f"{r['method']}/{r['score']}" + (f"={r['alpha']:g}" if r["score"] == "alpha" else "") + f"/{r['lang']}":
            round(r["value"], 2) for r in result.metrics if r["metric"] == "sumr"}
    ctx.summary.update(methods=methods + ([cfg.zero_shot.name] if cfg.zero_shot else []),
                       languages=list(data.languages), items=len(data.item_ids), sumr=sumr,
                       report_markdown=report, seconds=round(time.perf_counter() - started, 3))
    ctx.log.info("evaluate: SumR (report: %s)\n%s", ctx.out_dir / "report.md", sumr_console_table(metrics))


def key_config(cfg: ExperimentConfig, fingerprints) -> dict:
    """Where the encoders run (device kind), and the published rows the report shows, by value: a
    corrected transcription rewrites the report."""
    from leccr.runtime.device import resolved_numerics
    from leccr.evaluation.published import rows_named

    extra = {"numerics": resolved_numerics(cfg, "evaluate", cfg.evaluate.device)}
    if cfg.evaluate.published:
        extra["published_rows"] = rows_named(cfg.evaluate.published)
    return extra


STAGE = StageDef(name="evaluate", upstream=("dataset", "describe", "features", "train"),
                 reads={"dataset": ("items.parquet", "captions.parquet"), "describe": ("*",), "features": ("*",),
                        "train": ("*",)},
                 section=section, run=run, key_config=key_config)
