"""The one change text gets on its way into a tokenizer or model.

Datasets, imported translations and the artifacts that hold them keep text byte for byte as read (a
caption's leading, trailing or repeated spaces and its no-break spaces included), so an artifact can
be checked against its source file. Tokenizers differ in what whitespace means to them (WordPiece
splits on it; SentencePiece and byte-level BPE make tokens of it), so every text a model reads (a
caption tokenised for the features, an English caption sent to the MT model, a search query, a
zero-shot caption) goes through `model_text` first: the same ids whatever the file's spacing.
"""
from __future__ import annotations


def model_text(text: str) -> str:
    """`text` with each run of whitespace (any Unicode space: tab, no-break space, ...) as one ASCII
    space and none at either end, what the captions were normalised to when read before."""
    return " ".join(text.split())
