"""Text side of the features: token ids of captions and descriptions, and the frozen encoder's states.

One tokenizer for everything (captions in every language, translations, descriptions): LECCR uses
one shared multilingual encoder (mBERT in the paper) for all of them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from leccr.runtime.device import resolve_device
from leccr.runtime.hub import model_path
from leccr.features.vision import resolve_precision
from leccr.features.model_text import model_text


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    path = model_path(path, "features.tokenizer / text_model")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        raise ValueError(f"tokenizer at {path} has no pad token; readers pad batches with it")
    return tokenizer


def tokenize(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Unpadded token ids (special tokens included), truncated to `max_length`, of each text as
    `model_text` spaces it (stored texts keep the spacing they were read with)."""
    if not texts:
        return []
    return tokenizer([model_text(text) for text in texts], truncation=True, max_length=max_length,
                     add_special_tokens=True)["input_ids"]


def join_views(tokenizer, views: list[str], join: str) -> str:
    """Several descriptions of one item as one text: 'concat' puts the tokenizer's separator token
    between them (BERT: `a [SEP] b`, encoded as `[CLS] a [SEP] b [SEP]`); 'first' keeps the first."""
    if join == "first":
        return views[0]
    if join != "concat":
        raise ValueError(f"description_join must be 'concat' or 'first', got {join!r}")
    separator = tokenizer.sep_token or "\n"
    return f" {separator} ".join(views)


class TextStateEncoder:
    """The frozen text encoder: token ids -> last hidden states, one float32 [n_tokens, dim] per sequence."""

    def __init__(self, path: str | Path, pad_token_id: int, device: str = "auto", precision: str = "auto"):
        from transformers import AutoModel

        path = model_path(path, "features.text_model")
        self.device = resolve_device(device)
        self.dtype = resolve_precision(precision, self.device)
        self.model = AutoModel.from_pretrained(path, dtype=self.dtype).to(self.device).eval()
        self.pad_token_id = pad_token_id
        self.dim = int(self.model.config.hidden_size)

    @torch.inference_mode()
    def encode(self, sequences: list[list[int]]) -> list[np.ndarray]:
        """One batch of unpadded id lists -> their states, each [len(ids), dim] (padding cut off)."""
        if not sequences:
            return []
        longest = max(len(ids) for ids in sequences)
        ids = torch.full((len(sequences), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            mask[row, : len(sequence)] = 1
        states = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        states = states.float().cpu().numpy()
        return [states[row, : len(sequence)] for row, sequence in enumerate(sequences)]
