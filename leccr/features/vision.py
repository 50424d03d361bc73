"""Visual features of one item: a vision tower over its image or sampled frames, or an imported array.

`VisionEncoder` loads any `AutoModel` vision tower by path (CLIPVisionModel, SiglipVisionModel, ViT,
or the `.vision_model` of a full CLIP/SigLIP) with its `AutoImageProcessor`, and returns per image
either its last hidden state `[n_tokens, dim]` (CLS + patches) or its pooled vector `[1, dim]`.
`ImportedFeatures` reads the arrays the benchmarks release (e.g. 4096-d frame features of MSR-VTT-CN).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from leccr.runtime.device import resolve_device
from leccr.runtime.hub import model_path
from leccr.media.image_processor import load_image_processor

log = logging.getLogger(__name__)

SIZE_KEYS = ("shortest_edge", "height", "width", "longest_edge")


class FeatureError(Exception):
    """One item's features cannot be produced (bad imported array, missing entry): recorded per item."""


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a GPU that has it (else fp16), fp32 on CPU (half matmuls there are slow or missing)."""
    if precision == "fp32":
        return torch.float32
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"unknown precision {precision!r}; expected auto | fp32 | fp16 | bf16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _size_override(size, image_size: int) -> dict[str, int]:
    """The processor's own size dict with every set edge replaced by `image_size` (square inputs)."""
    keys = [key for key in SIZE_KEYS if getattr(size, key, None) is not None
            or (isinstance(size, dict) and size.get(key) is not None)]
    if not keys:
        raise ValueError(f"cannot override image size: the processor's size {size!r} sets none of {SIZE_KEYS}")
    return {key: image_size for key in keys}


class VisionEncoder:
    """A frozen vision tower. `encode(images)` -> float32 numpy [n_images, n_tokens, dim].

    output="tokens": last_hidden_state (n_tokens = CLS + patches); output="pooled": pooler_output
    (one token per image; the mean of the tokens for towers without a pooler).
    """

    def __init__(self, path: str | Path, output: str = "tokens", image_size: int | None = None,
                 device: str = "auto", precision: str = "auto"):
        from transformers import AutoConfig, AutoModel

        path = model_path(path, "features.vision_model")
        if output not in ("tokens", "pooled"):
            raise ValueError(f"visual_output must be 'tokens' or 'pooled', got {output!r}")
        self.output, self.image_size = output, image_size
        self.device = resolve_device(device)
        self.dtype = resolve_precision(precision, self.device)
        config = AutoConfig.from_pretrained(path)
        model = AutoModel.from_pretrained(path, dtype=self.dtype)
        # A full dual encoder (CLIP, SigLIP) keeps its image tower in .vision_model: use that alone.
        if getattr(config, "vision_config", None) is not None and hasattr(model, "vision_model"):
            model = model.vision_model
        self.model = model.to(self.device).eval()
        self.processor = load_image_processor(path)  # PIL in every environment (leccr.media.image_processor)
        self.processor_kwargs: dict = {}
        if image_size is not None:
            self.processor_kwargs["size"] = _size_override(self.processor.size, image_size)
            if getattr(self.processor, "crop_size", None) is not None:
                self.processor_kwargs["crop_size"] = _size_override(self.processor.crop_size, image_size)
        self.name = path.name

    @torch.inference_mode()
    def encode(self, images: list) -> np.ndarray:
        """PIL images -> float32 [n_images, n_tokens, dim] (n_tokens = 1 when pooled)."""
        pixels = self.processor(images, return_tensors="pt", **self.processor_kwargs)["pixel_values"]
        kwargs = {"interpolate_pos_encoding": True} if self.image_size is not None else {}
        outputs = self.model(pixel_values=pixels.to(self.device, self.dtype), **kwargs)
        if self.output == "tokens":
            states = outputs.last_hidden_state
        else:
            pooled = getattr(outputs, "pooler_output", None)
            states = (pooled if pooled is not None else outputs.last_hidden_state.mean(dim=1))[:, None, :]
        return states.float().cpu().numpy()


def _as_tokens(array: np.ndarray, where: str) -> np.ndarray:
    """An imported array as float32 [n_tokens, dim]: [dim] is one token; more than 2 dims is an error."""
    array = np.asarray(array)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise FeatureError(f"{where}: expected an array of shape [dim] or [n_tokens, dim], got {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise FeatureError(f"{where}: expected floating-point features, got dtype {array.dtype}")
    if not np.isfinite(array).all():
        raise FeatureError(f"{where}: features hold NaN or infinite values")
    return np.ascontiguousarray(array, dtype=np.float32)


def _load_npz_array(path: Path, archive) -> np.ndarray:
    if "features" in archive.files:
        return archive["features"]
    if len(archive.files) == 1:
        return archive[archive.files[0]]
    raise FeatureError(f"{path}: an .npz of one item needs a 'features' array or a single array; it has {archive.files}")


class ImportedFeatures:
    """Pre-extracted features: one .npz (`ids` + `features`) for all items, or each item's `feature_path`."""

    def __init__(self, import_path: str | Path | None):
        self.source = Path(import_path) if import_path is not None else None
        self.index: dict[str, int] = {}
        self.matrix: np.ndarray | None = None
        if self.source is not None:
            if self.source.suffix != ".npz":
                raise ValueError(f"features.import_path must be an .npz with 'ids' and 'features' arrays, got {self.source}")
            with np.load(self.source, allow_pickle=False) as archive:
                missing = [name for name in ("ids", "features") if name not in archive.files]
                if missing:
                    raise ValueError(f"{self.source}: missing array(s) {missing}; it holds {archive.files}")
                ids, self.matrix = archive["ids"], archive["features"]
            if len(ids) != len(self.matrix):
                raise ValueError(f"{self.source}: {len(ids)} ids but {len(self.matrix)} feature rows")
            self.index = {str(item_id): row for row, item_id in enumerate(ids.tolist())}
            if len(self.index) != len(ids):
                raise ValueError(f"{self.source}: 'ids' holds duplicates ({len(ids) - len(self.index)} repeated)")

    def get(self, item_id: str, feature_path: str | None) -> np.ndarray:
        """float32 [n_tokens, dim] of one item; FeatureError when it has none or a malformed one."""
        if self.matrix is not None:
            row = self.index.get(item_id)
            if row is None:
                raise FeatureError(f"no row for this item in {self.source.name}")
            return _as_tokens(self.matrix[row], f"{self.source.name} row {row}")
        if not feature_path:
            raise FeatureError("item has no feature_path and features.import_path is not set")
        path = Path(feature_path)
        if not path.is_file():
            raise FeatureError(f"feature file not found: {path}")
        try:
            if path.suffix == ".npy":
                return _as_tokens(np.load(path, allow_pickle=False), str(path))
            if path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as archive:
                    return _as_tokens(_load_npz_array(path, archive), str(path))
        except (OSError, ValueError) as error:
            raise FeatureError(f"cannot read {path}: {error}") from None
        raise FeatureError(f"unsupported feature file {path} (expected .npy or .npz)")
