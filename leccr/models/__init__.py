"""Retrieval models (baseline, LECCR, CL2CM): one factory over a folder of JSON model configs.

    list_models()                                   -> ["baseline-image", ..., "leccr-video-tiny"]
    create_model("leccr-image", text_encoder_path="/models/mbert", num_slots=2, losses={"w_d": 0.3})
    create_model_from_config(ModelConfig(...), text_encoder_path)

`create_model` applies the JSON, then the overrides (nested dicts such as `losses` / `ablations`
merge key by key), validates the result as `ModelConfig`, and lets the explicit "arch" field pick the
class. Importing this package (or `leccr.models.config`) does not import torch; building a model does.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from leccr.models.config import PRESETS, AblationConfig, LossConfig, MethodPreset, ModelConfig, get_preset

if TYPE_CHECKING:
    from leccr.models.base import RetrievalModel

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"

__all__ = [
    "MODEL_CONFIG_DIR",
    "PRESETS",
    "AblationConfig",
    "LossConfig",
    "MethodPreset",
    "ModelConfig",
    "create_model",
    "create_model_from_config",
    "get_model_config",
    "get_preset",
    "list_models",
    "merge_overrides",
    "model_class",
]


@lru_cache(maxsize=1)
def _configs() -> dict[str, dict[str, Any]]:
    configs = {}
    for path in sorted(MODEL_CONFIG_DIR.glob("*.json")):
        configs[path.stem] = json.loads(path.read_text(encoding="utf-8"))
    return configs


def list_models() -> list[str]:
    """Names of the bundled model configs, sorted."""
    return sorted(_configs())


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_overrides(merged[key], value)
        else:
            merged[key] = value
    return merged


def get_model_config(name: str, **overrides: Any) -> ModelConfig:
    """The validated config of model `name` with `overrides` applied (no torch needed)."""
    configs = _configs()
    if name not in configs:
        raise ValueError(f"unknown model config {name!r}; known models: {', '.join(sorted(configs))}")
    data = merge_overrides(configs[name], overrides)
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in problem['loc']) or '<root>'}: {problem['msg']} (got {problem.get('input')!r})"
            for problem in error.errors()
        )
        raise ValueError(f"model config {name!r} with overrides {overrides!r} is invalid: {problems}") from None


def model_class(arch: str) -> type[RetrievalModel]:
    """The nn.Module class for an "arch" value."""
    from leccr.models.baseline import BaselineModel
    from leccr.models.cl2cm import Cl2cmModel
    from leccr.models.slot_model import LeccrModel

    classes = {"baseline": BaselineModel, "leccr": LeccrModel, "cl2cm": Cl2cmModel}
    if arch not in classes:
        raise ValueError(f"unknown arch {arch!r}; known archs: {sorted(classes)}")
    return classes[arch]


def create_model_from_config(config: ModelConfig, text_encoder_path: str | Path) -> RetrievalModel:
    """Build the model of `config.arch`; the text encoder loads from `text_encoder_path`
    (`AutoModel.from_pretrained`, local files only); every other module is freshly initialised."""
    return model_class(config.arch).from_pretrained_text(config, text_encoder_path)


def create_model(name: str, text_encoder_path: str | Path, **overrides: Any) -> RetrievalModel:
    """open_clip-style factory: JSON config `name`, then `overrides`, then the class named by "arch"."""
    return create_model_from_config(get_model_config(name, **overrides), text_encoder_path)
