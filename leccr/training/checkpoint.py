"""What a trained method folder holds, and the resume state of an unfinished one.

    <method>/model.safetensors   the best weights (by validation SumR), every module incl. the text encoder
    <method>/model.json          {"method", "model": ModelConfig, "text_encoder": <folder name>}
    <method>/text_encoder/       the text encoder's config.json (+ tokenizer files): the architecture to
                                 rebuild before loading the weights, and the tokenizer to encode queries
    <method>/history.parquet     one row per step (losses, lr) and per validation (SumR per language)
    <method>/train_info.json     written last: the method is finished (best epoch, SumR, timings)
    <method>/_resume/state.pt    while training: weights, optimiser, schedule, position, history so far

Everything is written through a temporary name and a rename, so a crash leaves either the old or the
new file, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from leccr.core.io import atomic_write_text, give_default_mode

MODEL_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "model.json"
TEXT_ENCODER_DIR = "text_encoder"
HISTORY_FILE = "history.parquet"
INFO_FILE = "train_info.json"
RESUME_DIR = "_resume"
STATE_FILE = "state.pt"


def save_text_encoder(text_encoder_path: str | Path, method_dir: Path) -> None:
    """Copy the text encoder's config (and tokenizer, when the folder has one) beside the weights."""
    from transformers import AutoConfig, AutoTokenizer

    target = method_dir / TEXT_ENCODER_DIR
    tmp = method_dir / f".{TEXT_ENCODER_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    AutoConfig.from_pretrained(str(text_encoder_path), local_files_only=True).save_pretrained(tmp)
    try:
        AutoTokenizer.from_pretrained(str(text_encoder_path), local_files_only=True).save_pretrained(tmp)
    except (OSError, ValueError):  # an encoder folder without tokenizer files: the weights still load
        pass
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def save_model(model: torch.nn.Module, method_dir: Path, method: str) -> Path:
    """The weights as safetensors plus model.json (the ModelConfig that rebuilds the modules)."""
    from safetensors.torch import save_model as save_safetensors

    path = method_dir / MODEL_FILE
    tmp = method_dir / f".{MODEL_FILE}.tmp-{os.getpid()}"
    save_safetensors(model, str(tmp))
    give_default_mode(tmp)
    os.replace(tmp, path)
    atomic_write_text(
        method_dir / MODEL_CONFIG_FILE,
        json.dumps(
            {"method": method, "model": model.config.model_dump(mode="json"), "text_encoder": TEXT_ENCODER_DIR},
            indent=2,
            sort_keys=True,
        ),
    )
    return path


def load_trained(method_dir: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The trained model of a method folder, in eval mode: modules from model.json and
    text_encoder/config.json, weights from model.safetensors (no pretrained download or load)."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModel

    from leccr.models import ModelConfig, model_class
    from leccr.models.text_encoder import TextEncoder

    method_dir = Path(method_dir)
    for name in (MODEL_FILE, MODEL_CONFIG_FILE, f"{TEXT_ENCODER_DIR}/config.json"):
        if not (method_dir / name).is_file():
            raise FileNotFoundError(f"{method_dir} is not a trained method folder: {name} is missing")
    saved = json.loads((method_dir / MODEL_CONFIG_FILE).read_text(encoding="utf-8"))
    config = ModelConfig.model_validate(saved["model"])
    encoder_config = AutoConfig.from_pretrained(str(method_dir / saved["text_encoder"]), local_files_only=True)
    model = model_class(config.arch)(config, TextEncoder(AutoModel.from_config(encoder_config)))
    load_model(model, str(method_dir / MODEL_FILE), strict=True, device=str(device))
    return model.to(device).eval()


# ------------------------------------------------------------------------------------------ resume
def save_state(method_dir: Path, state: dict[str, Any]) -> None:
    folder = method_dir / RESUME_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{STATE_FILE}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, folder / STATE_FILE)


def load_state(method_dir: Path) -> dict[str, Any] | None:
    path = method_dir / RESUME_DIR / STATE_FILE
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def clear_state(method_dir: Path) -> None:
    shutil.rmtree(method_dir / RESUME_DIR, ignore_errors=True)
