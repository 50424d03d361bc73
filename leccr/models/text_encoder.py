"""The shared multilingual text encoder: any Hugging Face `AutoModel` loaded from a local path.

English captions, their translations and (in `description_encoder: shared` mode) the MLLM
descriptions all go through this one encoder, as in the paper (mBERT). The projection of [CLS]
into the joint space lives in the method model, not here.
"""
from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from leccr.runtime.hub import model_path


class TextEncoder(nn.Module):
    """Wraps `transformers.AutoModel.from_pretrained(path)`.

    forward(ids [B, L] long, mask [B, L] bool/int, True/1 = real token)
        -> (token states [B, L, D_t], [CLS] state [B, D_t]  (position 0))
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        config = model.config
        width = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
        if not width:
            raise ValueError(
                f"text encoder {type(model).__name__} has no hidden_size/d_model in its config; "
                "cannot size the projection into the joint space"
            )
        self.width = int(width)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> TextEncoder:
        """Load the encoder from a local folder (never downloads: `local_files_only`)."""
        from transformers import AutoModel

        path = model_path(path, "text encoder")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"text encoder folder {path} has no config.json (expected a save_pretrained folder)")
        return cls(AutoModel.from_pretrained(str(path), local_files_only=True))

    def forward(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        output = self.model(input_ids=ids, attention_mask=mask.long(), return_dict=True)
        states = output.last_hidden_state
        return states, states[:, 0]
