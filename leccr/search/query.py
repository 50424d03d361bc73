"""Raw query text -> a trained method's normalised text embeddings.

The trained method folder keeps its text encoder's tokenizer (`text_encoder/`, leccr/training/
checkpoint.py); tokenised the way the features stage tokenised the training captions (same call,
same max_length, specials included), a query in any trained language lands where its captions did.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from leccr.runtime.threads import MODEL_LOADING
from leccr.search.request import UnknownLanguage


class QueryEncoder:
    """`encode_queries(texts, lang) -> [N, E]` float32 on the CPU, batched, without gradients."""

    def __init__(
        self,
        model,
        tokenizer,
        max_length: int,
        languages: Sequence[str],
        device: torch.device | str = "cpu",
        batch_size: int = 64,
    ):
        if tokenizer.pad_token_id is None:
            raise ValueError("the method's tokenizer has no pad token; queries are padded with it")
        self.model = model.eval().to(device)
        self.tokenizer, self.max_length = tokenizer, max_length
        self.languages = list(languages)
        self.device, self.batch_size = torch.device(device), batch_size
        # A fast tokenizer sets truncation on its Rust backend at each call: two threads calling it at
        # once fail with "Already borrowed". Tokenising is cheap; the encoder runs unlocked.
        self._tokenizer_lock = threading.Lock()

    @classmethod
    def load(
        cls,
        method_dir: str | Path,
        max_length: int,
        languages: Sequence[str],
        device: torch.device | str = "cpu",
        batch_size: int = 64,
    ) -> QueryEncoder:
        """From a trained method folder (model.safetensors, model.json, text_encoder/ with its tokenizer)."""
        with MODEL_LOADING:  # transformers' lazy module is not safe to first touch from two threads
            from transformers import AutoTokenizer

        from leccr.training import load_trained

        method_dir = Path(method_dir)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(method_dir / "text_encoder"), local_files_only=True)
        except (OSError, ValueError) as error:
            raise FileNotFoundError(
                f"{method_dir / 'text_encoder'} holds no tokenizer to encode queries with: {error}"
            ) from None
        return cls(load_trained(method_dir, device), tokenizer, max_length, languages, device, batch_size)

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, L] ids and mask, exactly as the features stage tokenised captions (then padded)."""
        from leccr.data.reader import pad_ids
        from leccr.features.text import tokenize

        with self._tokenizer_lock:
            ids = tokenize(self.tokenizer, list(texts), self.max_length)
        return pad_ids([torch.tensor(row, dtype=torch.long) for row in ids], self.tokenizer.pad_token_id)

    def encode_queries(self, texts: Sequence[str], lang: str) -> torch.Tensor:
        from leccr.models.encode import encode_texts

        if lang not in self.languages:
            raise UnknownLanguage(f"language {lang!r} is not one this model was trained on: {self.languages}")
        if not texts:
            return torch.empty(0)
        ids, mask = self.tokenize(texts)
        return encode_texts(self.model, ids, mask, self.batch_size, self.device)
