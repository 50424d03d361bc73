"""Tiny LLaVAs built from configs with random weights, saved where `from_pretrained` and vLLM load them.

`build_tiny_llava`: LLaVA-1.5 style (videos as one `<image>` per frame). `build_tiny_llava_onevision`:
LLaVA-OneVision style, with native video input (`<video>`), for `describe.video_input: video`.

Shapes: CLIP vision tower (2 layers, width 64, 32 px images, patch 8 → 16 patch tokens + CLS) →
2-layer MLP projector → Llama (2 layers, width 128, 2 heads of head_dim 64: vLLM's CPU attention
rejects head_dim 16). The tokenizer is a byte-level BPE trained on the given corpus with `<image>`
as a special token and a LLaVA-1.5 chat template (`USER: <image>\\n... ASSISTANT:`).

Two things make the folder load in vLLM exactly like a hub checkpoint (see ENVIRONMENT.md):
- transformers 5 saves the vision tower as `vision_tower.embeddings...`; vLLM's LLaVA (and real
  `llava-hf/*` checkpoints) expect `vision_tower.vision_model.embeddings...`. We rename the keys
  in the safetensors file; transformers loads that layout too.
- The processor gets `num_additional_image_tokens=1` (the CLS token), or with the "default" feature
  strategy it would count one image token too few and the prompt would not match the features.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
IMAGE_SIZE = 32
PATCH_SIZE = 8

# LLaVA-1.5's conversation format (as in llava-hf's chat templates); content may be a string or a list
# of {"type": "image"} / {"type": "video"} / {"type": "text", "text": ...} parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'video' %}<video>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Files whose presence marks a finished folder (the folder is renamed into place only when complete).
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json")


def _train_tokenizer(corpus: list[str], vocab_size: int, extra_special: list[str] = ()):
    """Byte-level BPE on `corpus` (plus the chat-template words), with BOS prepended on encode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + list(extra_special),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(list(corpus) + ["USER: ASSISTANT: describe the image video scene"], trainer)
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    named = {"image_token": IMAGE_TOKEN, **({"video_token": VIDEO_TOKEN} if VIDEO_TOKEN in extra_special else {})}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=named,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _hub_layout(weights: dict) -> dict:
    """Rename `[model.]vision_tower.X` to `[model.]vision_tower.vision_model.X` (the llava-hf/vLLM layout)."""
    renamed = {}
    for name, tensor in weights.items():
        for prefix in ("vision_tower.", "model.vision_tower."):
            if name.startswith(prefix) and not name.startswith(prefix + "vision_model."):
                name = prefix + "vision_model." + name[len(prefix) :]
                break
        renamed[name] = tensor
    return renamed


def _save_in_hub_layout(model, processor, out: Path, kind: str, seed: int, corpus: list[str]) -> Path:
    """Save to a temporary sibling folder, rename the vision-tower keys, then rename the folder into place."""
    import torch
    from safetensors.torch import load_file, save_file

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = processor.tokenizer
    # Random init gives tiny logits everywhere; a larger output scale makes greedy decoding depend
    # clearly on the input (so engine agreement tests compare something) instead of near-ties.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    weights_path = tmp / "model.safetensors"
    save_file(_hub_layout(load_file(weights_path)), weights_path, metadata={"format": "pt"})
    (tmp / "tiny_model.json").write_text(
        json.dumps({"kind": kind, "seed": seed, "corpus_lines": len(corpus)}, indent=2) + "\n"
    )
    if out.exists():  # an incomplete folder from an interrupted older build
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _text_config(tokenizer, max_positions: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def build_tiny_llava(out: Path, corpus: list[str], seed: int) -> Path:
    """Build (once) a tiny random-weight LLaVA(-1.5 style) in `out`; deterministic for the same corpus and seed.

    Videos reach it as frames, one `<image>` per frame. Written to a temporary sibling folder and
    renamed into place, so a folder at `out` is complete.
    """
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    out = Path(out)
    if all((out / name).is_file() for name in _REQUIRED):
        return out
    if not corpus:
        raise ValueError("build_tiny_llava: the tokenizer corpus is empty")
    tokenizer = _train_tokenizer(corpus, vocab_size=512)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
        do_convert_rgb=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=64,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=_text_config(tokenizer, 512),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    return _save_in_hub_layout(model, processor, out, "tiny-llava", seed, corpus)


def build_tiny_llava_onevision(out: Path, corpus: list[str], seed: int) -> Path:
    """Build (once) a tiny random-weight LLaVA-OneVision: images *and* native video input (`<video>`).

    SigLIP vision tower (2 layers, 32 px, patch 8 → 16 tokens per tile/frame, no CLS), anyres image
    tiles on a 32/64 px grid, video frames pooled 2x2 (4 tokens per frame); the same 2-layer Llama
    (OneVision checkpoints use Qwen2; the architecture is read from text_config either way).
    """
    import torch
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        SiglipVisionConfig,
    )

    out = Path(out)
    if all((out / name).is_file() for name in _REQUIRED):
        return out
    if not corpus:
        raise ValueError("build_tiny_llava_onevision: the tokenizer corpus is empty")
    tokenizer = _train_tokenizer(corpus, vocab_size=512, extra_special=[VIDEO_TOKEN])
    pinpoints = [
        [IMAGE_SIZE, IMAGE_SIZE],
        [IMAGE_SIZE, 2 * IMAGE_SIZE],
        [2 * IMAGE_SIZE, IMAGE_SIZE],
        [2 * IMAGE_SIZE, 2 * IMAGE_SIZE],
    ]
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_grid_pinpoints=pinpoints, do_pad=True
        ),
        video_processor=LlavaOnevisionVideoProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tokenizer,
        num_image_tokens=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
        vision_aspect_ratio="anyres_max_9",
    )
    vision = SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=_text_config(tokenizer, 2048),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    return _save_in_hub_layout(model, processor, out, "tiny-llava-onevision", seed, corpus)
