"""Default description prompts (views) shipped as package data: `image.yaml` and `video.yaml`."""

from __future__ import annotations

from importlib import resources

import yaml

MEDIA_TYPES = ("image", "video")


def default_views(media_type: str) -> dict[str, str]:
    """The default view_id -> prompt mapping for `media_type` ("image" or "video"), in file order."""
    if media_type not in MEDIA_TYPES:
        raise ValueError(f"no default prompts for media_type {media_type!r}; known: {list(MEDIA_TYPES)}")
    text = resources.files(__package__).joinpath(f"{media_type}.yaml").read_text(encoding="utf-8")
    views = yaml.safe_load(text)
    if not isinstance(views, dict) or not all(isinstance(v, str) and v.strip() for v in views.values()):
        raise ValueError(f"leccr/prompts/{media_type}.yaml must map view ids to non-empty prompt strings")
    return {str(view_id): prompt.strip() for view_id, prompt in views.items()}
