"""A tiny BERT-style multilingual text encoder with a WordPiece tokenizer trained on the given corpus.

Stands in for `bert-base-multilingual-cased` (the paper's encoder) in tests and the CPU demo: the
same classes, loaded with the same `AutoTokenizer` / `AutoModel.from_pretrained(path)` calls.
Shapes: hidden 64, 2 layers, 4 heads, intermediate 128, 256 positions.
"""
from __future__ import annotations

from pathlib import Path

from leccr.tiny_models._save import build_folder

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def train_wordpiece(corpus: list[str], vocab_size: int = 2000):
    """A cased WordPiece tokenizer like mBERT's: CJK characters split one by one, [CLS] x [SEP]."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=False, lowercase=False)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False)
    backend.train_from_iterator(sorted(corpus), trainer)  # sorted: the same vocabulary whatever the order
    cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return BertTokenizerFast(tokenizer_object=backend, do_lower_case=False, tokenize_chinese_chars=True,
                             unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]",
                             mask_token="[MASK]", model_max_length=256)


def build_text_encoder(out: Path, corpus: list[str], seed: int = 0) -> Path:
    """Build (once) the tiny encoder + tokenizer in `out`; deterministic for the same corpus and seed."""
    if not corpus:
        raise ValueError("build_text_encoder: the tokenizer corpus is empty")

    def write(tmp: Path) -> None:
        import torch
        from transformers import BertConfig, BertModel

        tokenizer = train_wordpiece(corpus)
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(seed)
        BertModel(config, add_pooling_layer=False).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return build_folder(out, REQUIRED, "text_encoder", seed, len(corpus), write)
