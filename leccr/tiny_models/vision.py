"""A tiny CLIP-style vision tower + image processor (stands in for CLIP ViT-B/32's vision tower).

Shapes: 32 px images, patch 8 → 16 patch tokens + [CLS] = 17 tokens of width 64; 2 layers, 4 heads.
Loads with `AutoModel.from_pretrained` (→ CLIPVisionModel) and `AutoImageProcessor.from_pretrained`.
"""

from __future__ import annotations

from pathlib import Path

from leccr.tiny_models._save import build_folder, recipe

REQUIRED = ("config.json", "model.safetensors", "preprocessor_config.json")
# Bump when the same seed would give different files (the demo folders then rebuild).
BUILD_VERSION = "2"


def build_vision(out: Path, seed: int = 0) -> Path:
    """Build (once) the tiny vision tower + image processor in `out`; the same seed gives the same bytes."""

    def write(tmp: Path) -> None:
        import torch
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        config = CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            projection_dim=64,
        )
        torch.manual_seed(seed)
        CLIPVisionModel(config).save_pretrained(tmp)
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp)

    return build_folder(out, REQUIRED, recipe("vision", BUILD_VERSION, seed, None), write)
