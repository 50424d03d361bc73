"""Device choice shared by every engine: "auto" means the GPU when there is one."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def cuda_available() -> bool:
    """torch.cuda.is_available(), without importing torch on a machine with no NVIDIA driver at all
    (planning a run there stays fast: every key asks)."""
    if not os.path.exists("/proc/driver/nvidia/version") and not os.environ.get("CUDA_VISIBLE_DEVICES"):
        return False
    import torch

    return torch.cuda.is_available()


def resolve_device(name: str = "auto") -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for, but torch sees no CUDA GPU on this machine")
    return device


def resolved_numerics(cfg, stage: str, device: str = "auto", precision: str | None = None) -> dict[str, str]:
    """What `device: auto` and `precision: auto` will mean where this stage runs: part of its key, since
    a GPU run (bf16) and a CPU run (fp32) of the same config give different numbers.

    Where the task runs: here (local runner), or a Ray worker with the GPUs that `runner.resources`
    gives the stage (the driver may have none)."""
    if device == "auto":
        wanted = cfg.runner.resources.get(stage) if cfg.runner.kind == "ray" else None
        if wanted is not None:
            kind = "cuda" if (wanted.num_gpus or 0) > 0 else "cpu"
        else:
            kind = "cuda" if cuda_available() else "cpu"
    else:
        kind = device.split(":", 1)[0]  # "cuda:1" -> cuda
    numerics = {"device_kind": kind}
    if precision is not None:
        if precision == "auto":
            # the engines' rule (leccr.features.vision, leccr.training.loop.autocast_context); a driver
            # without the GPU its Ray workers have assumes bf16 support
            if kind != "cuda":
                precision = "fp32"
            elif stage == "train" or not cuda_available() or _bf16_supported():
                precision = "bf16"
            else:
                precision = "fp16"
        numerics["precision"] = precision
    return numerics


def _bf16_supported() -> bool:
    import torch

    return torch.cuda.is_bf16_supported()
