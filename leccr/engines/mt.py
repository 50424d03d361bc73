"""Machine translation with any transformers seq2seq model (MarianMT, NLLB, M2M100), batched.

Identical source captions are translated once (benchmarks repeat captions a lot), and batches
are formed from length-sorted texts so padding stays small.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from leccr.runtime.device import resolve_device
from leccr.runtime.hub import model_path
from leccr.features.model_text import model_text

log = logging.getLogger(__name__)

# NLLB-200 language codes for the languages CCR benchmarks use.
NLLB_CODES = {"en": "eng_Latn", "de": "deu_Latn", "fr": "fra_Latn", "cs": "ces_Latn", "ja": "jpn_Jpan",
              "zh": "zho_Hans"}


class Seq2SeqTranslator:
    """Translates English text into a target language with a model loaded by `from_pretrained(path)`.

    `lang_code_style` tells how the target language reaches the model: "marian" prefixes the
    multi-target token (`>>de<<`), "nllb"/"m2m100" set the source language on the tokenizer and force
    the target language as the first generated token, "none" means the model only does one pair.
    """

    def __init__(self, path: str | Path, lang_code_style: str = "none", device: str = "auto",
                 batch_size: int = 32, max_length: int = 128, num_beams: int = 1):
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        self.path = model_path(path, "translate.models")
        self.lang_code_style = lang_code_style
        self.device = resolve_device(device)
        self.batch_size, self.max_length, self.num_beams = batch_size, max_length, num_beams
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.model = AutoModelForSeq2SeqLM.from_pretrained(self.path, dtype=dtype).to(self.device).eval()

    def _language_setup(self, lang: str) -> tuple[str, dict]:
        """The text prefix and generate() arguments that select target language `lang`."""
        if self.lang_code_style == "none":
            return "", {}
        if self.lang_code_style == "marian":
            token = f">>{lang}<<"
            vocab = self.tokenizer.get_vocab()
            if token not in vocab:
                known = sorted(t for t in vocab if t.startswith(">>") and t.endswith("<<"))
                raise ValueError(f"{self.path}: no target-language token {token!r}; the model knows {known}")
            return token + " ", {}
        if self.lang_code_style == "nllb":
            self.tokenizer.src_lang = NLLB_CODES["en"]
            if lang not in NLLB_CODES:
                raise ValueError(f"no NLLB code for language {lang!r}; known: {sorted(NLLB_CODES)}")
            return "", {"forced_bos_token_id": self.tokenizer.convert_tokens_to_ids(NLLB_CODES[lang])}
        if self.lang_code_style == "m2m100":
            self.tokenizer.src_lang = "en"
            return "", {"forced_bos_token_id": self.tokenizer.get_lang_id(lang)}
        raise ValueError(f"unknown lang_code_style {self.lang_code_style!r}")

    @torch.inference_mode()
    def translate(self, texts: list[str], lang: str) -> list[str]:
        """Translate `texts` (English) into `lang`; returns one string per input, in input order."""
        prefix, generate_kwargs = self._language_setup(lang)
        unique = sorted(set(texts), key=lambda t: (len(t), t))
        translated: dict[str, str] = {}
        for start in range(0, len(unique), self.batch_size):
            batch = unique[start : start + self.batch_size]
            encoded = self.tokenizer([prefix + model_text(t) for t in batch], return_tensors="pt", padding=True,
                                     truncation=True, max_length=self.max_length).to(self.device)
            generated = self.model.generate(**encoded, max_new_tokens=self.max_length,
                                            num_beams=self.num_beams, do_sample=False, **generate_kwargs)
            decoded = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
            translated.update(zip(batch, (d.strip() for d in decoded)))
        return [translated[t] for t in texts]
