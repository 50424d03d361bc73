"""Training and evaluation readers over a features artifact, in the model's batch contract.

Training (`TrainingDataset` + `FeatureCollate`): one sample per English caption of the split that has
a machine translation into the target language and a visual row; the batch is

    visual        [B, N_v, D] float32   visual tokens (zero-padded for videos of different lengths)
    visual_mask   [B, N_v]    bool      True on real tokens
    en_ids/en_mask   [B, L_s] long/bool English caption tokens (pad = the tokenizer's pad id)
    tgt_ids/tgt_mask [B, L_t] long/bool its translation into the target language
    desc_ids/desc_mask [B, L_c] long/bool description tokens (all configured views joined with [SEP]
                                         by the features stage; see FeaturesConfig.description_join)
    desc_states   [B, L_c, D_t] float32 the frozen encoder's states of those tokens, when cached
    item_index    [B]         long      the visual item of each row (rows with the same index are
                                         captions of one item: all positives in the id-aware losses)

Items without a description: `missing_descriptions="drop"` removes their captions from the dataset;
`"empty"` gives them the encoding of an empty description (`[CLS] [SEP]` for BERT, with its states),
so attention over descriptions never sees an all-masked row.

Evaluation (`load_eval_items`, `load_eval_captions`): every visual item of a split (with its
description, empty when missing: the protocol keeps every test item), and every caption of one
language of that split with the index of its item.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
from torch.utils.data import Dataset

from leccr.data.tables import FeatureTables

log = logging.getLogger(__name__)

# Views over memory-mapped Arrow buffers are read-only; torch warns once that writing to such a tensor
# is undefined. Nothing writes to them (collate copies into fresh batch tensors), so the warning is noise.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

MISSING_DESCRIPTION_MODES = ("drop", "empty")


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array)


def pad_ids(sequences: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D id tensors -> (ids [B, L] long padded with pad_id, mask [B, L] bool)."""
    longest = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.bool)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = sequence
        mask[row, : len(sequence)] = True
    return ids, mask


def pad_tokens(arrays: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[n_i, D] tensors -> (float32 [B, max n, D] zero-padded, mask [B, max n] bool)."""
    longest = max(a.shape[0] for a in arrays)
    dim = arrays[0].shape[1]
    if any(a.shape[1] != dim for a in arrays):
        raise ValueError(f"token widths differ within a batch: {sorted({a.shape[1] for a in arrays})}")
    if all(a.shape[0] == longest for a in arrays):  # fixed shapes (images): one stacked copy
        return torch.stack(arrays).float(), torch.ones((len(arrays), longest), dtype=torch.bool)
    out = torch.zeros((len(arrays), longest, dim), dtype=torch.float32)
    mask = torch.zeros((len(arrays), longest), dtype=torch.bool)
    for row, array in enumerate(arrays):
        out[row, : array.shape[0]] = array
        mask[row, : array.shape[0]] = True
    return out, mask


class FeatureCollate:
    """Samples of TrainingDataset -> one batch dict (see the module docstring). Picklable for workers."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        visual, visual_mask = pad_tokens([s["visual"] for s in samples])
        return {"visual": visual, "visual_mask": visual_mask, **self.text(samples)}

    def text(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        """Everything but the visual tokens: padded ids and masks, states, item_index."""
        batch: dict[str, torch.Tensor] = {}
        batch["en_ids"], batch["en_mask"] = pad_ids([s["en_ids"] for s in samples], self.pad_token_id)
        batch["tgt_ids"], batch["tgt_mask"] = pad_ids([s["tgt_ids"] for s in samples], self.pad_token_id)
        batch["desc_ids"], batch["desc_mask"] = pad_ids([s["desc_ids"] for s in samples], self.pad_token_id)
        if "desc_states" in samples[0]:
            batch["desc_states"], _ = pad_tokens([s["desc_states"] for s in samples])
        batch["item_index"] = torch.tensor([s["item_index"] for s in samples], dtype=torch.long)
        return batch


def _rows_where(table, **equal) -> np.ndarray:
    """Row numbers of `table` where every named string column equals its value."""
    mask = None
    for name, value in equal.items():
        this = pc.equal(table.column(name), value)
        mask = this if mask is None else pc.and_(mask, this)
    return np.flatnonzero(mask.to_numpy(zero_copy_only=False)) if mask is not None else np.arange(table.num_rows)


class TrainingDataset(Dataset):
    """(English caption, its translation, visual tokens, description) samples of one split and language.

    `features`: a features artifact folder or opened FeatureTables. `use_states`: return cached
    description states (default: when the artifact has them).
    """

    def __init__(
        self,
        features: str | Path | FeatureTables,
        lang: str,
        split: str = "train",
        missing_descriptions: str = "empty",
        use_states: bool | None = None,
        arrow_cache: bool = True,
    ):
        if missing_descriptions not in MISSING_DESCRIPTION_MODES:
            raise ValueError(
                f"missing_descriptions must be one of {MISSING_DESCRIPTION_MODES}, got {missing_descriptions!r}"
            )
        self.tables = features if isinstance(features, FeatureTables) else FeatureTables.open(features, arrow_cache)
        self.arrow_cache = arrow_cache
        tables = self.tables
        if use_states and not tables.has_states:
            raise ValueError(
                f"{tables.root}: description states were not cached "
                "(features.description_states is false); use token ids or rerun features"
            )
        self.use_states = tables.has_states if use_states is None else use_states
        self.lang, self.split = lang, split

        visual_rows, item_ids = tables.split_items(split)
        item_position = {item_id: index for index, item_id in enumerate(item_ids)}
        self.item_ids = item_ids  # item_index -> item_id
        self.visual_rows = visual_rows  # item_index -> row of the visual table

        text = tables.text
        en_rows = _rows_where(text, lang="en", kind="human", split=split)
        tgt_rows = _rows_where(text, lang=lang, kind="mt", split=split)
        caption_ids = text.column("caption_id")
        tgt_row_of = dict(zip(caption_ids.take(tgt_rows).to_pylist(), tgt_rows.tolist()))
        en_items = text.column("item_id").take(en_rows).to_pylist()
        en_captions = caption_ids.take(en_rows).to_pylist()
        desc_row_of = tables.description_row_of

        samples, self.dropped = [], {"no_visual": 0, "no_translation": 0, "no_description": 0}
        for en_row, item_id, caption_id in zip(en_rows.tolist(), en_items, en_captions):
            item = item_position.get(item_id)
            if item is None:
                self.dropped["no_visual"] += 1
                continue
            tgt_row = tgt_row_of.get(caption_id)
            if tgt_row is None:
                self.dropped["no_translation"] += 1
                continue
            desc_row = desc_row_of.get(item_id, -1)
            if desc_row < 0 and missing_descriptions == "drop":
                self.dropped["no_description"] += 1
                continue
            samples.append((en_row, tgt_row, item, desc_row))
        if not samples:
            raise ValueError(
                f"{tables.root}: no training sample for split {split!r}, language {lang!r} "
                f"({len(en_rows)} English captions, {len(tgt_rows)} {lang} translations, "
                f"{len(item_ids)} visual items; dropped {self.dropped})"
            )
        array = np.asarray(samples, dtype=np.int64)
        self.en_rows, self.tgt_rows, self.item_index, self.desc_rows = array.T.copy()
        self.without_description = int((self.desc_rows < 0).sum())
        if any(self.dropped.values()) or self.without_description:
            log.info(
                "%s %s/%s: %d samples; dropped %s; %d with an empty description",
                tables.root.name,
                split,
                lang,
                len(self),
                self.dropped,
                self.without_description,
            )

    def __len__(self) -> int:
        return len(self.en_rows)

    def __getstate__(self) -> dict:
        # DataLoader workers started with spawn/forkserver get the dataset pickled: send the folder,
        # not the tables (pickling an Arrow table copies every buffer); each worker maps the files again.
        state = self.__dict__.copy()
        state["tables"] = (str(self.tables.root), self.arrow_cache)
        return state

    def __setstate__(self, state: dict) -> None:
        root, arrow_cache = state["tables"]
        state["tables"] = FeatureTables.open(root, arrow_cache)
        self.__dict__.update(state)

    def __getitem__(self, index: int) -> dict:
        """One sample: tensors viewing the memory-mapped buffers (no copy), unpadded."""
        tables = self.tables
        item = int(self.item_index[index])
        desc_ids, desc_states = tables.description(int(self.desc_rows[index]))
        sample = {
            "visual": _tensor(tables.visual_tokens(int(self.visual_rows[item]))),
            "en_ids": _tensor(tables.text_ids[int(self.en_rows[index])]),
            "tgt_ids": _tensor(tables.text_ids[int(self.tgt_rows[index])]),
            "desc_ids": _tensor(desc_ids),
            "item_index": item,
        }
        if self.use_states:
            sample["desc_states"] = _tensor(desc_states)
        return sample

    def collate_fn(self) -> FeatureCollate:
        return FeatureCollate(self.tables.pad_token_id)

    def get_batch(self, indices) -> dict[str, torch.Tensor]:
        """A whole batch at once (same values as collating the samples); fixed-shape visual features are
        gathered with one numpy fancy-index copy instead of one view per sample."""
        indices = np.asarray(indices, dtype=np.int64)
        collate = self.collate_fn()
        values = self.tables.visual_values
        if not values.fixed:
            return collate([self[int(index)] for index in indices])
        samples = [self[int(index)] for index in indices]
        rows = self.visual_rows[self.item_index[indices]]
        visual = values.gather(rows).reshape(len(rows), int(self.tables.visual_n_tokens[rows[0]]), -1)
        return {
            "visual": torch.from_numpy(visual).float(),
            "visual_mask": torch.ones(visual.shape[:2], dtype=torch.bool),
            **collate.text(samples),
        }


# ------------------------------------------------------------------------------------------- evaluation
@dataclass
class EvalItems:
    """Every visual item of a split, in visual-table order (the index `EvalCaptions.item_index` uses)."""

    item_ids: list[str]
    visual: torch.Tensor  # [N, N_v, D] float32
    visual_mask: torch.Tensor  # [N, N_v] bool
    desc_ids: torch.Tensor  # [N, L_c] long
    desc_mask: torch.Tensor  # [N, L_c] bool
    desc_states: torch.Tensor | None  # [N, L_c, D_t] float32, when cached
    has_description: torch.Tensor  # [N] bool: False where the empty description was filled in


@dataclass
class EvalCaptions:
    """Every caption of one language (and kind) of a split, with the item each belongs to."""

    lang: str
    caption_ids: list[str]
    item_ids: list[str]
    item_index: torch.Tensor  # [C] long, index into EvalItems
    ids: torch.Tensor  # [C, L] long
    mask: torch.Tensor  # [C, L] bool


def load_eval_items(
    features: str | Path | FeatureTables,
    split: str = "test",
    use_states: bool | None = None,
    arrow_cache: bool = True,
    chunk: slice | None = None,
) -> EvalItems:
    """Every visual item of `split`, or only `chunk` of them (in the same order): a collection too big
    to hold as padded tensors at once is encoded chunk by chunk."""
    tables = features if isinstance(features, FeatureTables) else FeatureTables.open(features, arrow_cache)
    use_states = tables.has_states if use_states is None else use_states
    rows, item_ids = tables.split_items(split)
    if chunk is not None:
        rows, item_ids = rows[chunk], item_ids[chunk]
    if not item_ids:
        raise ValueError(f"{tables.root}: no visual item in split {split!r}")
    visual, visual_mask = pad_tokens([_tensor(tables.visual_tokens(int(r))) for r in rows])
    desc_row_of = tables.description_row_of
    desc_rows = [desc_row_of.get(item_id, -1) for item_id in item_ids]
    described = [tables.description(r) for r in desc_rows]
    desc_ids, desc_mask = pad_ids([_tensor(ids) for ids, _ in described], tables.pad_token_id)
    desc_states = pad_tokens([_tensor(states) for _, states in described])[0] if use_states else None
    return EvalItems(
        item_ids,
        visual,
        visual_mask,
        desc_ids,
        desc_mask,
        desc_states,
        torch.tensor([r >= 0 for r in desc_rows], dtype=torch.bool),
    )


def query_caption_kind(tables: FeatureTables, lang: str, split: str, wanted: str = "auto") -> str:
    """Which captions of `lang` in `split` are the retrieval queries — the one rule for validation and
    evaluation: `wanted` ("human" or "mt"), or for "auto" the split's human captions in that language
    when it has any, else its machine translations (most CCR releases ship MT captions for validation
    and references for test only)."""
    if wanted != "auto":
        return wanted
    rows = _rows_where(tables.text, lang=lang, kind="human", split=split)
    return "human" if len(rows) else "mt"


def load_eval_captions(
    features: str | Path | FeatureTables,
    lang: str,
    items: EvalItems,
    split: str = "test",
    kind: str = "human",
    arrow_cache: bool = True,
) -> EvalCaptions:
    """Captions of `lang` and `kind` (human: the dataset's own; mt: translations) in `split`.

    Captions of items that have no visual row (failed extraction) are left out, with a log line.
    """
    tables = features if isinstance(features, FeatureTables) else FeatureTables.open(features, arrow_cache)
    rows = _rows_where(tables.text, lang=lang, kind=kind, split=split)
    position = {item_id: index for index, item_id in enumerate(items.item_ids)}
    caption_ids = tables.text.column("caption_id").take(rows).to_pylist()
    item_ids = tables.text.column("item_id").take(rows).to_pylist()
    keep = [i for i, item_id in enumerate(item_ids) if item_id in position]
    if len(keep) < len(rows):
        log.info(
            "%s: %d %s captions of %s belong to items without visual features; left out",
            tables.root.name,
            len(rows) - len(keep),
            lang,
            split,
        )
    if not keep:
        raise ValueError(f"{tables.root}: no {kind} caption in {lang!r} for split {split!r}")
    ids, mask = pad_ids([_tensor(tables.text_ids[int(rows[i])]) for i in keep], tables.pad_token_id)
    return EvalCaptions(
        lang,
        [caption_ids[i] for i in keep],
        [item_ids[i] for i in keep],
        torch.tensor([position[item_ids[i]] for i in keep], dtype=torch.long),
        ids,
        mask,
    )
