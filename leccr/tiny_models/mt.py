"""A tiny Marian-style MT model with opus-mt multi-target language tokens (`>>de<<` ...).

Random weights: it translates nothing, but it runs through exactly the code real Marian/opus-mt
models run through (`AutoTokenizer`, `AutoModelForSeq2SeqLM.from_pretrained(path).generate`).
Shapes: d_model 64, 2 encoder + 2 decoder layers, 4 heads, FFN 128.
"""

from __future__ import annotations

from pathlib import Path

from leccr.tiny_models._save import build_folder, recipe

LANGUAGE_TOKENS = [">>de<<", ">>fr<<", ">>zh<<", ">>cs<<", ">>ja<<"]
SPECIAL = ["<pad>", "</s>", "<unk>"]
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")
# Bump when the same seed and corpus would give different files (the demo folders then rebuild).
BUILD_VERSION = "3"
# CJK ideographs, kana and hangul: one pre-token each (as BERT splits them), so Chinese and Japanese
# captions, which have no spaces, do not become one BPE "word" (and one token) per sentence.
# Random init (std 0.02, post-norm layers) leaves the decoder nearly deaf to the source: greedy output was
# the same for 31 of 32 demo captions. Scaling the cross-attention value/output projections makes it
# depend on the source (15 distinct outputs of 32 at 8x), so tests of the translate path compare
# something; like the tiny LLaVA's output scale (mllm.py). It still translates nothing.
CROSS_ATTENTION_GAIN = 8.0
CJK_CHARACTER = r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]"


def train_tokenizer(corpus: list[str], vocab_size: int = 1500):
    """A BPE over the corpus with Marian's conventions: `</s>` appended, `<pad>` = 0, `▁` marks word starts.

    `BpeTrainer` (no continuing-subword prefix) numbers symbols in sorted order, so the same corpus
    gives the same tokenizer.json in every process (unlike `WordPieceTrainer`, see text.py).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(), pre_tokenizers.Split(Regex(CJK_CHARACTER), behavior="isolated")]
    )
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL + LANGUAGE_TOKENS, show_progress=False)
    backend.train_from_iterator(sorted(corpus), trainer)
    eos = backend.token_to_id("</s>")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=LANGUAGE_TOKENS,
        model_max_length=512,
    )


def build_mt(out: Path, corpus: list[str], seed: int = 0) -> Path:
    """Build (once) the tiny MT model + tokenizer in `out`; the same corpus and seed give the same bytes."""
    if not corpus:
        raise ValueError("build_mt: the tokenizer corpus is empty")

    def write(tmp: Path) -> None:
        import torch
        from transformers import MarianConfig, MarianMTModel

        tokenizer = train_tokenizer(corpus)
        pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
        config = MarianConfig(
            vocab_size=len(tokenizer),
            d_model=64,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            max_position_embeddings=512,
            pad_token_id=pad,
            eos_token_id=eos,
            decoder_start_token_id=pad,
            forced_eos_token_id=eos,
        )
        torch.manual_seed(seed)
        model = MarianMTModel(config)
        with torch.no_grad():
            for layer in model.model.decoder.layers:
                layer.encoder_attn.v_proj.weight.mul_(CROSS_ATTENTION_GAIN)
                layer.encoder_attn.out_proj.weight.mul_(CROSS_ATTENTION_GAIN)
        # Marian starts decoding from <pad>, as opus-mt checkpoints do.
        model.generation_config.update(
            decoder_start_token_id=pad, eos_token_id=eos, pad_token_id=pad, max_length=64, num_beams=1
        )
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return build_folder(out, REQUIRED, recipe("mt", BUILD_VERSION, seed, corpus), write)
