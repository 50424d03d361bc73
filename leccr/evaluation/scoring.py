"""What the evaluate and index stages share: a split's captions, items and descriptions through the
features reader, the encoders, and the score of METHOD.md as block functions.

A library module (no stage imports it back), so the index stage's code identity holds no report code.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from leccr.config import EvaluateConfig, ZeroShotConfig
from leccr.core.context import StageContext
from leccr.core.failures import StageFailed
from leccr.runtime.hub import model_path
from leccr.media.paths import resolve_media_path
from leccr.schemas.core import read_table
from leccr.schemas.dataset import CAPTIONS, ITEMS

if TYPE_CHECKING:  # torch is imported where it is used: planning a run never loads it
    import torch

    from leccr.evaluation.metrics import ScoreBlock


# ===================================================================================== ranks
def _blocks(n: int, chunk: int) -> list[slice]:
    return [slice(start, min(start + chunk, n)) for start in range(0, n, chunk)]


# ===================================================================================== inputs
@dataclass
class LanguageTexts:
    caption_ids: list[str]
    texts: list[str]  # the caption text (error analysis, zero-shot tokenisation)
    item_index: np.ndarray  # [N_t] index into the split's items
    ids: torch.Tensor  # [N_t, L] the features tokenizer's ids (trained models)
    mask: torch.Tensor  # [N_t, L] bool


@dataclass
class SplitData:
    """The evaluated split: items with their features and descriptions, captions per language."""

    items: object  # leccr.data.EvalItems (visual [N, N_v, D], masks, description ids/states)
    item_ids: list[str]
    media_types: list[str]
    paths: list[str | None]  # media files, resolved against the configured dataset root
    coverage: str  # "16 of 17 test items (1 failed upstream: see ...)" for the log and the report
    desc_texts: list[str]  # the item's description text (error analysis), "" when none
    languages: dict[str, LanguageTexts]


def load_split(ctx: StageContext, cfg: EvaluateConfig) -> SplitData:
    """The split's items, features, descriptions and captions, through the features reader."""
    from leccr.data import FeatureTables, load_eval_captions, load_eval_items, query_caption_kind

    dataset, features = ctx.inputs["dataset"], ctx.inputs["features"]
    tables = FeatureTables.open(features.path)
    try:
        items = load_eval_items(tables, cfg.split)
    except ValueError as error:
        raise StageFailed(f"evaluate: {error}") from None
    # Only the split's rows become Python objects: the whole dataset's captions are 20 per item at
    # Multi30K's size (620k rows), the test split's 1/31 of them.
    dataset_items = {row["item_id"]: row for row in _split_rows(dataset.file("items.parquet"), ITEMS, cfg.split,
                                                                  ["item_id", "split", "media_type", "path"])}
    captions = _split_rows(dataset.file("captions.parquet"), CAPTIONS, cfg.split,
                           ["caption_id", "lang", "kind", "text"])
    caption_text = {(c["caption_id"], c["lang"], c["kind"]): c["text"] for c in captions}
    # Languages and kinds present in the split's caption tokens (shipped MT and translations included).
    text = tables.text
    split_rows = pc.equal(text.column("split"), cfg.split)
    pairs = {(lang, kind) for lang, kind in zip(text.column("lang").filter(split_rows).to_pylist(),
                                                 text.column("kind").filter(split_rows).to_pylist())}
    present = sorted({lang for lang, _ in pairs}, key=lambda lang: (lang != "en", lang))
    wanted = cfg.languages or present
    languages: dict[str, LanguageTexts] = {}
    for lang in wanted:
        kinds = {kind for pair_lang, kind in pairs if pair_lang == lang}
        if not kinds:
            raise StageFailed(f"evaluate: no captions in language {lang!r} for split {cfg.split!r} "
                              f"(languages with captions there: {present})")
        kind = query_caption_kind(tables, lang, cfg.split, cfg.caption_kind)
        if kind not in kinds:
            raise StageFailed(f"evaluate: no {kind} captions in language {lang!r} for split {cfg.split!r} "
                              f"(languages with captions there: {present})")
        found = load_eval_captions(tables, lang, items, cfg.split, kind=kind)
        if kind == "mt":  # a translation row carries its English caption's id; its text is not in the dataset
            texts = [caption_text.get((cid, lang, "mt"), "(machine translation)") for cid in found.caption_ids]
        else:
            texts = [caption_text.get((cid, lang, kind), "") for cid in found.caption_ids]
        languages[lang] = LanguageTexts(found.caption_ids, texts, found.item_index.numpy(), found.ids, found.mask)
    described = _description_texts(ctx, items.item_ids)
    return SplitData(
        items=items,
        item_ids=list(items.item_ids),
        media_types=[dataset_items.get(i, {}).get("media_type", "image") for i in items.item_ids],
        paths=[resolve_media_path(ctx.dataset_root, dataset_items.get(i, {}).get("path")) for i in items.item_ids],
        coverage=_coverage(dataset_items, list(items.item_ids), cfg.split, features.path),
        desc_texts=[described.get(i, "") for i in items.item_ids],
        languages=languages,
    )


def _split_rows(path: Path, schema, split: str, columns: list[str]) -> list[dict]:
    """`columns` of the rows of one split of a dataset table, as dicts."""
    table = read_table(path, schema, columns=sorted({*columns, "split"}))
    return table.filter(pc.equal(table.column("split"), split)).select(columns).to_pylist()


def _coverage(dataset_items: dict[str, dict], evaluated: list[str], split: str, features_dir: Path) -> str:
    """How many of the split's dataset items are evaluated, and where the others' failures are recorded."""
    total = sum(1 for row in dataset_items.values() if row["split"] == split)
    missing = total - len(evaluated)
    text = f"{len(evaluated)} of {total} {split} items"
    if missing:
        text += f" ({missing} failed upstream: see {features_dir / 'visual' / 'errors.parquet'})"
    return text


def _description_texts(ctx: StageContext, item_ids: list[str]) -> dict[str, str]:
    """Item id -> its description text (views joined), for the error analysis."""
    import pyarrow.parquet as pq

    wanted = pa.array(sorted(set(item_ids)), pa.string())
    texts: dict[str, list[str]] = {}
    for part in ctx.inputs["describe"].parts():
        table = pq.read_table(part, columns=["item_id", "view_id", "description"])
        for row in table.filter(pc.is_in(table.column("item_id"), wanted)).to_pylist():
            texts.setdefault(row["item_id"], []).append(f"[{row['view_id']}] {row['description']}")
    return {item: " ".join(views) for item, views in texts.items()}


# ===================================================================================== encoders
def encode_trained(model, data: SplitData, batch_size: int, device: torch.device
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """(text embeddings per language [N_t, E], visual global [N_v, E], slots [N_v, N_q, E] or None), on CPU."""
    from leccr.models.encode import encode_items, encode_texts

    model.eval().to(device)
    texts = {lang: encode_texts(model, language.ids, language.mask, batch_size, device)
             for lang, language in data.languages.items()}
    visual_global, visual_slots = encode_items(model, data.items, batch_size, device)
    return texts, visual_global, visual_slots


def load_encoder(path: str):
    """The model class named in the folder's config.json `architectures` (e.g. CLIPTextModelWithProjection,
    whose projection `AutoModel` would drop), else `AutoModel`; local files only."""
    import transformers
    from transformers import AutoConfig, AutoModel

    path = str(model_path(path, "evaluate.zero_shot"))
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    named = [getattr(transformers, name, None) for name in (config.architectures or [])]
    cls = next((c for c in named if c is not None), AutoModel)
    return cls.from_pretrained(path, local_files_only=True)


def _embedding(output, names: Sequence[str]) -> torch.Tensor:
    for name in names:
        value = getattr(output, name, None)
        if value is not None:
            return value
    return output.last_hidden_state[:, 0]


def encode_zero_shot(zs: ZeroShotConfig, data: SplitData, batch_size: int, device: torch.device
                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Normalised text embeddings per language and visual embeddings of a CLIP-style encoder pair."""
    import torch

    with torch.no_grad():
        return _encode_zero_shot(zs, data, batch_size, device)


def _encode_zero_shot(zs: ZeroShotConfig, data: SplitData, batch_size: int, device: torch.device
                      ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    from leccr.media.image_processor import load_image_processor
    from leccr.media.decode import load_visual
    from leccr.features.model_text import model_text

    tokenizer = AutoTokenizer.from_pretrained(model_path(zs.tokenizer or zs.text_model, "evaluate.zero_shot.tokenizer"),
                                              local_files_only=True)
    text_model = load_encoder(zs.text_model).eval().to(device)
    texts = {}
    for lang, language in data.languages.items():
        chunks = []
        for start in range(0, len(language.texts), batch_size):
            batch = tokenizer([model_text(t) for t in language.texts[start:start + batch_size]], padding=True,
                              truncation=True, max_length=zs.max_length, return_tensors="pt").to(device)
            chunks.append(_embedding(text_model(**batch), ("text_embeds", "pooler_output")).float().cpu())
        texts[lang] = F.normalize(torch.cat(chunks), dim=-1)
    processor = load_image_processor(model_path(zs.vision_model, "evaluate.zero_shot.vision_model"),
                                     local_files_only=True)
    vision_model = load_encoder(zs.vision_model).eval().to(device)
    visual = []
    for start in range(0, len(data.item_ids), batch_size):
        frames, counts = [], []
        for index in range(start, min(start + batch_size, len(data.item_ids))):
            if data.paths[index] is None:
                raise StageFailed(f"evaluate zero-shot: item {data.item_ids[index]!r} has no media file to encode")
            item_frames = load_visual(data.paths[index], data.media_types[index], num_frames=zs.num_frames)
            frames += item_frames
            counts.append(len(item_frames))
        pixels = processor(images=frames, return_tensors="pt")["pixel_values"].to(device)
        frame_emb = _embedding(vision_model(pixel_values=pixels), ("image_embeds", "pooler_output")).float().cpu()
        # a video's embedding: the mean of its frames' embeddings (one frame for an image)
        visual += [chunk.mean(0) for chunk in frame_emb.split(counts)]
    visual_emb = F.normalize(torch.stack(visual), dim=-1)
    width = {lang: t.shape[1] for lang, t in texts.items()}
    if any(w != visual_emb.shape[1] for w in width.values()):
        raise StageFailed(f"evaluate zero-shot: text embeddings are {width} wide but visual ones "
                          f"{visual_emb.shape[1]}: the two encoders do not share a space")
    return texts, visual_emb


# ===================================================================================== scoring
def whole_ranges(text_emb: torch.Tensor, visual_global: torch.Tensor, visual_slots: torch.Tensor,
                 chunk_size: int) -> dict[str, tuple[float, float]]:
    """(min, max) of the global and the slot score matrices over every (text, item) pair, block by block
    (the fused score's normalisation; the index stage fixes it this way for search too)."""
    from leccr.models.base import merge_ranges, score_ranges, similarity_parts

    ranges: dict[str, tuple[float, float]] = {}
    for r in _blocks(len(text_emb), chunk_size):
        for c in _blocks(len(visual_global), chunk_size):
            ranges = merge_ranges(ranges, score_ranges(*similarity_parts(text_emb[r], visual_global[c], visual_slots[c])))
    return ranges


def make_score_block(text_emb: torch.Tensor, visual_global: torch.Tensor, visual_slots: torch.Tensor | None,
                     alpha: float, chunk_size: int) -> ScoreBlock:
    """The score of METHOD.md as a block function, with min/max taken over the whole matrix first.

    alpha = 1: the global cosine only (no min/max needed: minmax is monotone, ranks are the same).
    """
    from leccr.models.base import fuse_scores, similarity_parts

    if alpha >= 1.0 or visual_slots is None:
        if alpha < 1.0:
            raise StageFailed(f"evaluate: alpha {alpha} < 1 needs slot features, and this model has none")

        def global_block(rows: slice, cols: slice) -> torch.Tensor:
            return text_emb[rows] @ visual_global[cols].t()

        return global_block
    ranges = whole_ranges(text_emb, visual_global, visual_slots, chunk_size)  # first pass

    def fused_block(rows: slice, cols: slice) -> torch.Tensor:
        global_sim, slot_sim = similarity_parts(text_emb[rows], visual_global[cols], visual_slots[cols])
        return fuse_scores(global_sim, slot_sim, alpha, ranges)

    return fused_block


def load_model(method_dir: Path):
    """The trained model of one method folder of a train artifact (weights + model.json)."""
    from leccr.training import load_trained

    return load_trained(method_dir)
