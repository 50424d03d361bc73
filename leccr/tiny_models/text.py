"""A tiny BERT-style multilingual text encoder with a WordPiece tokenizer trained on the given corpus.

Stands in for `bert-base-multilingual-cased` (the paper's encoder) in tests and the CPU demo: the
same classes, loaded with the same `AutoTokenizer` / `AutoModel.from_pretrained(path)` calls.
Shapes: hidden 64, 2 layers, 4 heads, intermediate 128, 256 positions.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from leccr.tiny_models._save import build_folder, recipe

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
# Bump when the same seed and corpus would give different files (the demo folders then rebuild).
BUILD_VERSION = "2"
# Budget of learned pieces (the WordPiece vocabulary holds each twice: `piece`, `##piece`); the demo
# corpus (about 1.5k captions, 4 languages) is covered by ~400 pieces, whole words included.
VOCAB_SIZE = 2000


def _bert_normalizer():
    from tokenizers import normalizers

    # Cased, accents kept (like mBERT-cased); CJK characters get spaces around them so each one is a word.
    return normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False)


def wordpiece_vocabulary(corpus: list[str], vocab_size: int = VOCAB_SIZE) -> dict[str, int]:
    """WordPiece vocabulary for `corpus`: the specials, then every learned piece plain and with `##`.

    Why not `tokenizers.trainers.WordPieceTrainer`: it numbers the `##x` symbols in hash-map order, so
    frequency ties break differently in each process and the same corpus gives a different
    tokenizer.json each run (checked: 10 of 454 tokens differ between two runs on the demo corpus),
    which would change the model folder's content fingerprint on every rebuild. `BpeTrainer` without
    a continuing-subword prefix numbers symbols in sorted order and is deterministic, so we learn the
    pieces with it on the words (as BertPreTokenizer splits them) and add each as `piece` and `##piece`.
    Token ids follow sorted token strings, so they do not depend on the order of `corpus` either.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    normalizer, splitter = _bert_normalizer(), pre_tokenizers.BertPreTokenizer()
    word_counts = Counter(
        word for line in corpus for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(line))
    )
    if not word_counts:
        raise ValueError("wordpiece_vocabulary: the corpus has no words (only empty or blank lines)")
    pieces_model = Tokenizer(models.BPE())  # no pre-tokenizer: each training string below is one word
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False)
    pieces_model.train_from_iterator(
        (word for word, count in sorted(word_counts.items()) for _ in range(count)), trainer
    )
    # Every learned piece (single characters included) both word-initial and continuing (`##`), so a
    # new word made of known characters splits into the longest known pieces, never into [UNK].
    pieces = pieces_model.get_vocab()
    tokens = set(pieces) | {"##" + piece for piece in pieces}
    ordered = SPECIAL + sorted(tokens - set(SPECIAL))
    return {token: index for index, token in enumerate(ordered)}


def train_wordpiece(corpus: list[str], vocab_size: int = VOCAB_SIZE):
    """A cased WordPiece tokenizer like mBERT's: CJK characters split one by one, `[CLS] x [SEP]`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    vocab = wordpiece_vocabulary(corpus, vocab_size)
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = _bert_normalizer()
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return BertTokenizerFast(
        tokenizer_object=backend,
        do_lower_case=False,
        tokenize_chinese_chars=True,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        model_max_length=256,
    )


def build_text_encoder(out: Path, corpus: list[str], seed: int = 0) -> Path:
    """Build (once) the tiny encoder + tokenizer in `out`; the same corpus and seed give the same bytes."""
    if not corpus:
        raise ValueError("build_text_encoder: the tokenizer corpus is empty")

    def write(tmp: Path) -> None:
        import torch
        from transformers import BertConfig, BertModel

        tokenizer = train_wordpiece(corpus)
        config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=256,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(seed)
        # With the pooler, as mBERT ships: without it `AutoModel` would add a randomly initialised one
        # on every load (a different pooler_output each time).
        BertModel(config, add_pooling_layer=True).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return build_folder(out, REQUIRED, recipe("text_encoder", BUILD_VERSION, seed, corpus), write)
